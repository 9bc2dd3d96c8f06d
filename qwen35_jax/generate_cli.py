"""`qwen35 generate SOURCE`: text from a training run directory or a Hugging Face checkpoint folder.

Text streams to stdout as it is generated; timing (and the MTP acceptance rate) goes to stderr; `--print-ids` ends
stdout with the generated ids, space-separated, on one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

from qwen35_jax import paths
from qwen35_jax.draft_vocab import MAX_DOCUMENTS
from qwen35_jax.errors import UserError


def load_source(source: str):
    """(cfg, params, tokenizer or None) from a run directory (config.json + checkpoints/) or an HF folder."""
    path = paths.path(source)
    if not path.exists():
        raise UserError(f"{source}: no such run directory or checkpoint folder")
    config = path / "config.json"
    if not config.exists():
        raise UserError(f"{source}: no config.json (expected a qwen35 run directory or a Hugging Face checkpoint)")
    record = json.loads(config.read_text())
    if (path / "checkpoints").exists():
        from qwen35_jax.train import data as train_data
        from qwen35_jax.train.convert import load_orbax_params, read_model_config, run_abstract_params

        cfg = read_model_config(path)
        params = load_orbax_params(path, cfg, warn=lambda msg: print(msg, file=sys.stderr),  # stdout: the text
                                   abstract=run_abstract_params(path))
        tokenizer = train_data.tokenizer_for(types.SimpleNamespace(tokenizer=record.get("tokenizer")))
        return cfg, params, tokenizer
    from qwen35_jax import hf

    cfg, params = hf.load(paths.local_dir(path))
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists():
        from qwen35_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path / ("tokenizer.json" if (path / "tokenizer.json").exists()
                                           else "tokenizer.model"))
    return cfg, params, tokenizer


def parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"{what} must be integers separated by commas, got {text!r}") from None


def _draft_vocab(args, cfg, tokenizer, stop):
    """The --draft-vocab ids: the most frequent tokens of --draft-vocab-data (or the run's training data), with the
    stop tokens always in."""
    from qwen35_jax import draft_vocab as dv

    if args.speculative is None:
        raise UserError("--draft-vocab restricts speculative drafts: add --speculative mtp")
    spec = args.draft_vocab_data if args.draft_vocab_data is not None else dv.run_data_spec(args.source)
    ids, counts = dv.pick(spec, tokenizer, cfg.vocab_size, args.draft_vocab, always=stop,
                          max_documents=args.draft_vocab_documents)
    print(f"draft vocabulary: {ids.size} of {cfg.vocab_size} tokens, {dv.coverage(counts, ids):.1%} of the "
          f"{int(counts.sum())} counted", file=sys.stderr)
    return ids


def generate_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="qwen35 generate", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run directory (qwen35 train) or a Hugging Face checkpoint folder")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, e.g. 1,2,3")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-ids", default=None, help="stop token ids (default: the tokenizer's end of text)")
    parser.add_argument("--speculative", choices=["mtp"], default=None, help="draft with the MTP head")
    parser.add_argument("--draft-tokens", type=int, default=2)
    parser.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                        help="draft among the N most frequent tokens of --draft-vocab-data only (a cheaper draft LM "
                             "head; the output is unchanged)")
    parser.add_argument("--draft-vocab-data", default=None, metavar="SPEC",
                        help="data the frequencies are counted on (a data spec as in training: stdlib, a path, "
                             "YAML; default: a run directory's own training data)")
    parser.add_argument("--draft-vocab-documents", type=int, default=MAX_DOCUMENTS,
                        help="count over at most this many documents")
    parser.add_argument("--print-ids", action="store_true", help="print the generated ids as the last line")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image placed before the prompt (repeatable; needs a vision-language checkpoint)")
    parser.add_argument("--min-pixels", type=int, default=256 * 256, help="images are resized to at least this")
    parser.add_argument("--max-pixels", type=int, default=1024 * 1024, help="images are resized to at most this")
    args = parser.parse_args(argv)

    from qwen35_jax.generation import generate

    cfg, params, tokenizer = load_source(args.source)
    if args.prompt is not None:
        if tokenizer is None:
            raise UserError(f"{args.source} has no tokenizer (tokenizer.json / tokenizer.model); use --prompt-ids")
        ids = list(tokenizer.encode(args.prompt))
        if not ids:
            raise UserError("--prompt encodes to no tokens")
    else:
        ids = parse_ids(args.prompt_ids, "--prompt-ids")
    vision_inputs = {}
    if args.image:
        from qwen35_jax.image_processing import image_prompt

        ids, pixel_values, grids = image_prompt(cfg, args.image, ids, min_pixels=args.min_pixels,
                                                max_pixels=args.max_pixels)
        vision_inputs = {"pixel_values": pixel_values, "image_grid_thw": grids}
    if args.stop_ids is not None:
        stop = parse_ids(args.stop_ids, "--stop-ids")
    else:
        stop = [tokenizer.eos_id] if tokenizer is not None and tokenizer.eos_id is not None else []

    draft_vocab = None
    if args.draft_vocab is not None:
        draft_vocab = _draft_vocab(args, cfg, tokenizer, stop)

    generated: list[int] = []
    shown = [""]

    def stream(new):
        generated.extend(new[0])
        if tokenizer is not None:
            text = tokenizer.decode(generated)
            if text.startswith(shown[0]):
                sys.stdout.write(text[len(shown[0]):])
                sys.stdout.flush()
                shown[0] = text

    if tokenizer is not None and args.prompt is not None:
        sys.stdout.write(args.prompt)
    result = generate(cfg, params, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, stop_tokens=stop, seed=args.seed,
                      speculative=args.speculative, draft_tokens=args.draft_tokens, draft_vocab=draft_vocab,
                      on_tokens=stream,
                      **vision_inputs)
    if tokenizer is not None:
        sys.stdout.write("\n")
    st = result.stats
    line = f"{st['new_tokens']} tokens, prefill {st['prefill_s']:.2f}s, decode {st['tokens_per_s']:.1f} tokens/s"
    if "acceptance_rate" in st:
        line += f", MTP acceptance {st['acceptance_rate']:.2f} ({st['tokens_per_round']:.2f} tokens per step)"
    print(line, file=sys.stderr)
    if args.print_ids:
        print(" ".join(map(str, result.tokens[0])))
    return 0
