"""The service's machinery apart from the ML library: the run store, training jobs, artifacts, the encoder cache and
the request batcher. Plain Python and PyTorch; imports no jina, like executor.tuning.
"""
