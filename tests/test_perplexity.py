import math

import pytest
import torch

from banklm.evaluation.perplexity import perplexity


class _Uniform(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform over V tokens: perplexity must be exactly V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        class Out:
            pass
        out = Out()
        out.logits = torch.zeros(*input_ids.shape, self.vocab) + self.w
        return out


class _Tok:
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 + 1 for c in text]


def test_uniform_model_has_perplexity_vocab_size():
    # every target has probability 1/V, so mean NLL = ln V and perplexity = V, padding excluded
    res = perplexity(_Uniform(64), _Tok(), ["银行信贷审批", "反洗钱", "审计底稿检查记录"], batch_size=2)
    assert res["perplexity"] == pytest.approx(64.0, rel=1e-5)
    assert res["nll_per_token"] == pytest.approx(math.log(64))
    assert res["tokens"] == (6 - 1) + (3 - 1) + (8 - 1)
    assert res["texts"] == 3


def test_peaked_model_lower_than_uniform():
    class Peaked(_Uniform):
        def forward(self, input_ids, attention_mask=None):
            out = super().forward(input_ids, attention_mask)
            nxt = torch.roll(input_ids, -1, dims=1)  # cheat: put mass on the true next token
            out.logits.scatter_(-1, nxt.unsqueeze(-1), 5.0)
            return out
    texts = ["银行信贷审批流程", "反洗钱可疑交易报告"]
    assert perplexity(Peaked(64), _Tok(), texts)["perplexity"] < perplexity(_Uniform(64), _Tok(), texts)["perplexity"]


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="at least one text"):
        perplexity(_Uniform(8), _Tok(), ["a"])
