"""Bundled text and task data, read offline from installed packages."""

from .tasks import TASKS, Generation, MultipleChoice, load_task
from .text import CORPORA, load_corpus, token_windows

CORPUS_IDS = (*CORPORA, "coqa", "drop")

__all__ = ["CORPORA", "CORPUS_IDS", "Generation", "MultipleChoice", "TASKS", "load_corpus", "load_task", "token_windows"]
