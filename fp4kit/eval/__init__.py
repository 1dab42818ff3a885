"""Evaluation: perplexity (more tasks arrive with the evaluation issue)."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
