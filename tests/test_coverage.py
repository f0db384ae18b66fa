"""``python -m pykernels coverage``: the layer-type list is read as the seed writes it, and layer types are classified
by what swap does with them (built from small configs)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from pykernels import coverage  # noqa: E402

SAMPLE = """# Neural Network Architecture Patterns (name-based)

## Hierarchical Structures

### feature-extraction
| Nesting Level | Component Count | Percentage |
|--------------|----------------|------------|
| 0 | 568 | 1.3% |

## Task-Specific Components

### image-feature-extraction
| Layer Type |
|-----------|
| ViTAttention |
| ViTEmbeddings |
| SwinAttention |

### fill-mask
| Layer Type |
|-----------|
| BeitMLP |
"""


def test_reads_the_seed_format(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text(SAMPLE)
    assert coverage.read_layer_types(path) == {
        "image-feature-extraction": ["ViTAttention", "ViTEmbeddings", "SwinAttention"],
        "fill-mask": ["BeitMLP"],
    }


@pytest.mark.parametrize(
    "name,status,kind,detail",
    [
        ("ViTAttention", "converted", "attention", "FusedViTAttention"),
        ("BeitMLP", "converted", "mlp", "FusedMlp"),
        # window attention: relative-position bias and shift mask on the fused op (Swin-V2: cosine attention too)
        ("SwinAttention", "converted", "attention", "FusedHFWindowAttention"),
        ("Swinv2Attention", "converted", "attention", "FusedHFWindowAttention"),
        ("DonutSwinSelfAttention", "skipped", "attention", "attention half"),
        # an encoder-decoder attention shares ViT's layout, but its forward takes key_value_states / a KV cache:
        # converting it would drop the cross-attention in the decoder (the probe, a self-attention, cannot see that)
        ("PegasusAttention", "skipped", "attention", "key_value_states"),
        ("NoSuchLayerAttention", "not found", "attention", "no class"),
    ],
)
def test_classifies_layer_types(name, status, kind, detail):
    entry = coverage.classify("task", name)
    assert (entry.status, entry.kind) == (status, kind), entry
    assert detail in entry.detail, entry


def test_markdown_and_cli(tmp_path, capsys):
    from pykernels.__main__ import main

    path = tmp_path / "list.txt"
    path.write_text(SAMPLE)
    out = tmp_path / "coverage.md"
    assert main(["coverage", "--list", str(path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| image-feature-extraction | `ViTAttention` | attention | converted |" in text
    assert "- image-feature-extraction: 1" in text  # ViTEmbeddings: not a kind swap handles
    assert "[3/3]" in capsys.readouterr().err  # progress
