"""Small transformers as the field builds and exports them: Hugging Face models from configs (random weights,
no download), torch.nn and timm transformers, exported with torch.onnx (legacy and new exporter) and optimum.

`export(family, exporter, seed, folder)` writes (or reuses) one .onnx file and returns its path; it raises
whatever the exporter raises when the exporter itself cannot handle the model.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

VOCAB, HIDDEN, LAYERS, HEADS, FFN = 96, 64, 2, 4, 128
BATCH, SEQ = 2, 8                      # the export's sizes; tests run other ones
IMAGE = 32
EXPORTERS = ("legacy", "dynamo", "optimum")


def _text(cls_name, cfg_name, task="text-classification", **extra):
    def build():
        import transformers
        cfg = getattr(transformers, cfg_name)(**extra)
        return getattr(transformers, cls_name)(cfg), "text", task
    return build


def _bert_like(cls, cfg, **kw):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=64, num_labels=3)
    return _text(cls, cfg, **{**common, **kw})


def _vision(cls, cfg, **kw):
    def build():
        import transformers
        config = getattr(transformers, cfg)(**kw)
        return getattr(transformers, cls)(config), "image", "image-classification"
    return build


VIT = dict(image_size=IMAGE, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
           intermediate_size=FFN, num_labels=5)
LLAMA = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
             num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=64, tie_word_embeddings=True,
             pad_token_id=0)


class NNEncoder:
    """torch.nn.TransformerEncoder over token embeddings, mean-pooled, with a classifier."""

    @staticmethod
    def build():
        import torch
        nn = torch.nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(VOCAB, HIDDEN)
                layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.1, batch_first=True)
                self.enc = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
                self.head = nn.Linear(HIDDEN, 3)

            def forward(self, input_ids):
                return self.head(self.enc(self.emb(input_ids)).mean(1))
        return Net(), "ids", None


class NNMha:
    """torch.nn.MultiheadAttention (fused in-projection) between two linear layers."""

    @staticmethod
    def build():
        import torch
        nn = torch.nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.inp = nn.Linear(12, HIDDEN)
                self.mha = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
                self.out = nn.Linear(HIDDEN, 3)

            def forward(self, x):
                h = torch.relu(self.inp(x))
                return self.out(self.mha(h, h, h, need_weights=False)[0].mean(1))
        return Net(), "seq12", None


def _timm(name, **kw):
    def build():
        import timm
        return timm.create_model(name, pretrained=False, num_classes=5, **kw), "image", None
    return build


def _patchtst():
    import transformers
    cfg = transformers.PatchTSTConfig(num_input_channels=3, context_length=32, patch_length=8, patch_stride=8,
                                      prediction_length=8, d_model=HIDDEN, num_attention_heads=HEADS,
                                      num_hidden_layers=LAYERS, ffn_dim=FFN)
    return transformers.PatchTSTForPrediction(cfg), "series", "time-series-forecasting"


def _tst():
    import transformers
    cfg = transformers.TimeSeriesTransformerConfig(prediction_length=4, context_length=8, lags_sequence=[1, 2],
                                                   num_time_features=1, d_model=HIDDEN, encoder_layers=LAYERS,
                                                   decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                                                   decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                                                   decoder_ffn_dim=FFN)
    return transformers.TimeSeriesTransformerModel(cfg), "tst", None


def _wav2vec2():
    import transformers
    cfg = transformers.Wav2Vec2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      intermediate_size=FFN, conv_dim=(32, 32), conv_stride=(5, 2),
                                      conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, num_labels=3, vocab_size=VOCAB)
    return transformers.Wav2Vec2ForSequenceClassification(cfg), "audio", "audio-classification"


FAMILIES = {
    "bert": _bert_like("BertForSequenceClassification", "BertConfig"),
    "distilbert": _text("DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=VOCAB, dim=HIDDEN,
                        n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=64, num_labels=3),
    "roberta": _bert_like("RobertaForSequenceClassification", "RobertaConfig", pad_token_id=1),
    "albert": _bert_like("AlbertForSequenceClassification", "AlbertConfig", embedding_size=32),
    "electra": _bert_like("ElectraForSequenceClassification", "ElectraConfig", embedding_size=32),
    "gpt2": _text("GPT2ForSequenceClassification", "GPT2Config", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                  n_head=HEADS, n_positions=64, num_labels=3, pad_token_id=0),
    "gpt2-lm": _text("GPT2LMHeadModel", "GPT2Config", "text-generation", vocab_size=VOCAB, n_embd=HIDDEN,
                     n_layer=LAYERS, n_head=HEADS, n_positions=64, use_cache=False),
    "llama": _text("LlamaForCausalLM", "LlamaConfig", "text-generation", use_cache=False, **LLAMA),
    "qwen2": _text("Qwen2ForCausalLM", "Qwen2Config", "text-generation", use_cache=False, **LLAMA),
    "t5-encoder": _text("T5EncoderModel", "T5Config", "feature-extraction", vocab_size=VOCAB, d_model=HIDDEN,
                        d_kv=16, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS),
    "vit": _vision("ViTForImageClassification", "ViTConfig", **VIT),
    "deit": _vision("DeiTForImageClassification", "DeiTConfig", **VIT),
    "swin": _vision("SwinForImageClassification", "SwinConfig", image_size=IMAGE, patch_size=4, embed_dim=32,
                    depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=5),
    "wav2vec2": _wav2vec2,
    "patchtst": _patchtst,
    "time-series-transformer": _tst,
    "nn-transformer-encoder": NNEncoder.build,
    "nn-multihead-attention": NNMha.build,
    "timm-vit-tiny": _timm("vit_tiny_patch16_224", img_size=IMAGE, patch_size=8, depth=LAYERS),
    "timm-deit-tiny": _timm("deit_tiny_patch16_224", img_size=IMAGE, patch_size=8, depth=LAYERS),
    "timm-levit": _timm("levit_128s", img_size=64),
}
HF = {f for f in FAMILIES if not f.startswith(("nn-", "timm-"))}


def build(family: str, seed: int):
    """The model in eval mode, with seed-dependent weights."""
    import torch
    torch.manual_seed(seed)
    with contextlib.redirect_stderr(io.StringIO()):
        model, kind, task = FAMILIES[family]()
    if hasattr(model, "config"):
        model.config.use_cache = False
    with torch.no_grad():      # as after training: no two biases or norm scales alike (exporters dedupe those)
        for p in model.parameters():
            if p.numel() and bool((p == p.reshape(-1)[0]).all()):
                p.add_(torch.empty_like(p).uniform_(-0.1, 0.1))
    return model.eval(), kind, task


def example_inputs(kind: str, batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a model of this kind, as numpy arrays (names are the HF forward arguments)."""
    rng = np.random.default_rng(seed)
    if kind == "text":
        mask = np.ones((batch, seq), np.int64)
        mask[0, seq - 2:] = 0                                   # one padded sequence
        return {"input_ids": rng.integers(2, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask}
    if kind == "ids":
        return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)}
    if kind == "seq12":
        return {"x": rng.normal(size=(batch, seq, 12)).astype(np.float32)}
    if kind == "image":
        return {"pixel_values": rng.normal(size=(batch, 3, IMAGE if batch else IMAGE, IMAGE)).astype(np.float32)}
    if kind == "audio":
        return {"input_values": rng.normal(size=(batch, 400 + 40 * seq)).astype(np.float32)}
    if kind == "series":
        return {"past_values": rng.normal(size=(batch, 32, 3)).astype(np.float32)}
    if kind == "tst":
        return {"past_values": rng.normal(size=(batch, 10)).astype(np.float32),
                "past_time_features": rng.normal(size=(batch, 10, 1)).astype(np.float32),
                "past_observed_mask": np.ones((batch, 10), np.float32),
                "future_values": rng.normal(size=(batch, 4)).astype(np.float32),
                "future_time_features": rng.normal(size=(batch, 4, 1)).astype(np.float32)}
    raise KeyError(kind)


DYNAMIC = {"text": {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "seq")},
           "ids": {"input_ids": ("batch", "seq")}, "seq12": {"x": ("batch", "seq")},
           "image": {"pixel_values": ("batch",)}, "audio": {"input_values": ("batch", "samples")},
           "series": {"past_values": ("batch",)},
           "tst": {k: ("batch",) for k in ("past_values", "past_time_features", "past_observed_mask",
                                           "future_values", "future_time_features")}}


def first_output(model, kind):
    """A wrapper returning only the model's main output tensor (logits, predictions or hidden states)."""
    import torch

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *args):
            names = list(DYNAMIC[kind])
            out = self.m(**dict(zip(names, args))) if hasattr(self.m, "config") else self.m(*args)
            if isinstance(out, torch.Tensor):
                return out
            return next(v for v in (out.to_tuple() if hasattr(out, "to_tuple") else out) if isinstance(v, torch.Tensor))
    return Head().eval()


def export(family: str, exporter: str, seed: int, folder) -> str:
    """Export one member; files are reused when present (the folder is a cache)."""
    folder = Path(folder)
    path = folder / f"{family}.{exporter}.{seed}.onnx"
    if path.exists():
        return str(path)
    folder.mkdir(parents=True, exist_ok=True)
    import torch
    model, kind, task = build(family, seed)
    feeds = example_inputs(kind)
    args = tuple(torch.from_numpy(feeds[k]) for k in DYNAMIC[kind])
    tmp = folder / f".{family}.{exporter}.{seed}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "optimum":
            if family not in HF:
                raise RuntimeError("optimum exports Hugging Face models only")
            from optimum.exporters.onnx import onnx_export_from_model
            with contextlib.redirect_stderr(io.StringIO()):
                onnx_export_from_model(model, tmp, task=task, do_validation=False, monolith=True)
            files = sorted(tmp.glob("*.onnx"))
            if len(files) != 1:
                raise RuntimeError(f"optimum wrote {[f.name for f in files]}")
            produced = files[0]
            if any(p.suffix != ".onnx" and p.name.endswith("_data") for p in tmp.iterdir()):
                raise RuntimeError("optimum wrote external data")
        else:
            wrapped = first_output(model, kind)
            names = list(DYNAMIC[kind])
            produced = tmp / "model.onnx"
            if exporter == "legacy":
                axes = {k: dict(enumerate(v)) for k, v in DYNAMIC[kind].items()}
                axes["output"] = {0: "batch"}
                torch.onnx.export(wrapped, args, str(produced), dynamo=False, opset_version=17, input_names=names,
                                  output_names=["output"], dynamic_axes=axes)
            else:
                dims = {}
                shapes = tuple({i: dims.setdefault(d, torch.export.Dim(d, min=2 if d == "batch" else 4))
                                if d != "samples" else torch.export.Dim.AUTO for i, d in enumerate(spec)}
                               for spec in DYNAMIC[kind].values())
                with contextlib.redirect_stderr(io.StringIO()):
                    program = torch.onnx.export(wrapped, args, dynamo=True, input_names=names,
                                                output_names=["output"], dynamic_shapes=(shapes,), verbose=False)
                program.save(str(produced))
    import onnx
    model_proto = onnx.load(str(produced))
    onnx.save(model_proto, str(path))              # one self-contained file
    shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
