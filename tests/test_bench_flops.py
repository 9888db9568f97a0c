"""The MFU numerator of bench/train_throughput.py, checked by hand on a real config (Qwen2, shrunk)."""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoConfig

from tests.conftest import config_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_throughput as tt


def qwen2(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
          vocab: int = 1000):
    config = AutoConfig.from_pretrained(config_path("qwen2"))
    for key, value in {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                       "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
                       "head_dim": hidden // heads}.items():
        setattr(config, key, value)
    return config


def test_full_fine_tuning_flops_by_hand() -> None:
    config = qwen2()
    # per layer: q, o 64x64 each; k, v 64x32 each (2 KV heads of 16); gate, up, down 64x128
    body = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    lengths, trained = [10, 30], 12
    attention = 6 * 2 * 64 * (10 * 10 + 30 * 30)  # causal: forward 2 n^2 (heads x head_dim) per layer, x3
    head = 6 * 64 * 1000 * trained  # trained positions only
    assert tt.training_flops(config, lengths, trained) == 6 * body * 40 + attention + head


def test_lora_frozen_base_does_no_weight_gradient() -> None:
    config = qwen2()
    adapters = tt.lora_parameters(config, 16)
    # rank 16 on q (64->64), k, v (64->32), o (64->64), gate, up (64->128), down (128->64), 2 layers
    assert adapters == 2 * 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    full = tt.training_flops(config, [20], 5)
    lora = tt.training_flops(config, [20], 5, adapters)
    body = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    attention = 6 * 2 * 64 * 20 * 20
    assert lora == 4 * body * 20 + 6 * adapters * 20 + attention + 4 * 64 * 1000 * 5
    assert full - lora == 2 * body * 20 + 2 * 64 * 1000 * 5 - 6 * adapters * 20  # the weight gradients it skips
