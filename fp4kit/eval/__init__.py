"""Evaluation: perplexity, multiple choice by log-likelihood, exact-match generation, reports."""

from .perplexity import PerplexityResult, bos_prefix, perplexity
from .runner import evaluate, model_hash, parse_tasks, read_jsonl, write_jsonl
from .scoring import (Scored, item_string, loglikelihoods, mean_stderr, multiple_choice_metrics, paired_stderr,
                      score_multiple_choice)

__all__ = ["PerplexityResult", "bos_prefix", "Scored", "evaluate", "item_string", "loglikelihoods", "mean_stderr",
           "model_hash", "multiple_choice_metrics", "paired_stderr", "parse_tasks", "perplexity", "read_jsonl",
           "score_multiple_choice", "write_jsonl"]
