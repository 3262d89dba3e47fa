"""Random-weight bf16 checkpoints at real shapes, written with transformers on the GPU
machine (no network): small Qwen2 / Qwen3 / Llama and a Qwen2.5-7B shape. Each directory
gets config.json, safetensors and a word-level tokenizer.json over the whole vocabulary
(bsa's loader wants a tokenizer; the checks feed token ids, so its content does not matter).

usage: make_checkpoints.py OUT_DIR [--only NAME ...]
"""
import argparse, json, os, sys, time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

try:
    from transformers import Qwen3Config
except ImportError:  # older transformers
    Qwen3Config = None

SHAPES = {
    # name: (config class name, kwargs)
    "qwen2-small": ("qwen2", dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                 num_key_value_heads=2, intermediate_size=1408, vocab_size=32000,
                                 tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=4096)),
    "qwen3-small": ("qwen3", dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                 num_key_value_heads=4, head_dim=128, intermediate_size=1536,
                                 vocab_size=32000, tie_word_embeddings=True, rope_theta=1e6,
                                 max_position_embeddings=4096)),
    "llama-small": ("llama", dict(hidden_size=576, num_hidden_layers=4, num_attention_heads=9,
                                 num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                 tie_word_embeddings=True, rope_theta=1e5, max_position_embeddings=4096)),
    # Qwen2.5-7B (../shared/gpu/README.md)
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=32768,
                                rms_norm_eps=1e-6)),
}


def config(kind, kw):
    if kind == "qwen2":
        return Qwen2Config(**kw)
    if kind == "qwen3":
        if Qwen3Config is None:
            raise SystemExit("this transformers has no Qwen3")
        return Qwen3Config(**kw)
    return LlamaConfig(**kw)


def word_tokenizer(vocab, path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    torch.manual_seed(0)
    report = {}
    for name, (kind, kw) in SHAPES.items():
        if a.only and name not in a.only:
            continue
        d = os.path.join(a.out, name)
        if os.path.exists(os.path.join(d, "config.json")):
            report[name] = {"dir": d, "cached": True}
            continue
        t = time.time()
        cfg = config(kind, kw)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        # Default init (std 0.02) gives nearly flat logits; a larger spread makes the
        # comparison sensitive (peaked softmax, large activations).
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 * 1.5)
        model.save_pretrained(d, safe_serialization=True)
        word_tokenizer(cfg.vocab_size, os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "t1", "bos_token": None}, f)
        n_params = sum(p.numel() for p in model.parameters())
        del model
        torch.cuda.empty_cache()
        report[name] = {"dir": d, "params": n_params, "write_s": round(time.time() - t, 1)}
        print(f"{name}: {n_params / 1e6:.0f}M params in {time.time() - t:.1f}s", file=sys.stderr)
    json.dump(report, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
