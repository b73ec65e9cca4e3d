"""The encoder cache: least recently used dropped first, one build per key however many ask at once."""

from __future__ import annotations

import threading

import pytest

from executor.service.encoder_cache import EncoderCache


def test_encoder_cache_is_lru_and_builds_once():
    cache = EncoderCache(size=2)
    builds = []

    def build(name):
        def make():
            builds.append(name)
            return f'encoder {name}'

        return make

    assert cache.get(('a',), build('a')) == 'encoder a'
    cache.get(('b',), build('b'))
    cache.get(('a',), build('a'))  # a is now the most recent
    cache.get(('c',), build('c'))  # evicts b
    assert cache.keys() == [('a',), ('c',)] and builds == ['a', 'b', 'c']
    cache.drop(lambda key: key == ('a',))
    assert cache.keys() == [('c',)]
    with pytest.raises(ValueError, match='at least 1'):
        EncoderCache(size=0)

    slow = threading.Event()
    counted = []

    def build_slow():
        counted.append(1)
        slow.wait(5)
        return 'slow'

    threads = [threading.Thread(target=cache.get, args=(('s',), build_slow)) for _ in range(4)]
    for t in threads:
        t.start()
    slow.set()
    for t in threads:
        t.join()
    assert counted == [1]
