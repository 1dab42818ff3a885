"""Bundled text and task data, read offline from installed packages."""

from .text import CORPORA, load_corpus

__all__ = ["CORPORA", "load_corpus"]
