"""Backbone families, one file each; every module here registers its family when the registry imports it.

Modules whose name starts with ``_`` hold what several families share and register nothing.
"""
