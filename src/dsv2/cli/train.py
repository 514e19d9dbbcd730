"""Training commands: corpus -> tokenizer -> token shards -> run directory -> Hugging Face model.

    dsv2 tokenizer train CORPUS... --out tok --vocab-size 8192 --include '*.py'
    dsv2 data prepare CORPUS... --tokenizer tok --out data --include '*.py' --val-fraction 0.02
    dsv2 train --data data --out runs/r1 --model tiny-stdlib --steps 2000
    dsv2 train --resume --out runs/r1                 # after a crash, Ctrl-C or kill: continues exactly
    dsv2 train --resume --out runs/r1 --resume-step 800 --lr 5e-4   # back to before a loss spike, gentler
    torchrun --nproc-per-node 4 $(which dsv2) train --data data --out runs/r2 --batch-size 32   # data parallel
    torchrun --nproc-per-node 4 $(which dsv2) train ... --expert-parallel 4   # experts split over the 4 ranks
    dsv2 plot runs/r1                                 # PNG charts in runs/r1/plots
    dsv2 export runs/r1 models/r1 --dtype bfloat16    # loads in dsv2 and transformers
    dsv2 evaluate models/r1 --data data               # held-out loss and bits per byte
"""
from __future__ import annotations

import argparse
import json
import sys

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _corpus_args(p) -> None:
    p.add_argument("inputs", nargs="+", metavar="CORPUS",
                   help="text files, directories (walked recursively) or .jsonl files (one document per line)")
    p.add_argument("--text-field", default="text", help="the JSONL field holding the document text (default: text)")
    p.add_argument("--include", action="append", default=None, metavar="GLOB",
                   help="only files matching this pattern, on the name or the path inside the directory, e.g. "
                        "'*.py' (repeatable; default: every file)")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                   help="skip matching files, e.g. 'site-packages/*' or '*/test/*' (repeatable)")


def optimizer_args(g, lr: str, warmup: int, schedule: str, weight_decay: float) -> None:
    """The schedule and AdamW options `dsv2 train` and `dsv2 sft` share (their defaults differ)."""
    g.add_argument("--lr", type=float, help=lr)
    g.add_argument("--warmup-steps", type=int, help=f"linear warm-up from 0 (default {warmup})")
    g.add_argument("--schedule", choices=("step", "cosine", "constant"),
                   help="after warm-up: step = x decay-factor at each decay point (the paper), cosine to "
                        f"lr x min-lr-ratio, or constant (default {schedule})")
    g.add_argument("--decay-points", type=lambda s: tuple(float(v) for v in s.split(",")),
                   help="fractions of training where step decay applies (default 0.6,0.9; V2-Lite: 0.8,0.9)")
    g.add_argument("--decay-factor", type=float, help="step decay multiplier (default 0.316)")
    g.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (default 0.1)")
    g.add_argument("--weight-decay", type=float,
                   help=f"AdamW weight decay on projection matrices (default {weight_decay:g})")
    g.add_argument("--beta1", type=float, help="AdamW beta1 (default 0.9)")
    g.add_argument("--beta2", type=float, help="AdamW beta2 (default 0.95)")
    g.add_argument("--grad-clip", type=float, help="global gradient-norm clip (default 1.0)")


def register(sub) -> None:
    # ---- dsv2 tokenizer train ---------------------------------------------------------------------------
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer").add_subparsers(
        dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    t = tok.add_parser("train", formatter_class=_FORMATTER, help="train a byte-level BPE tokenizer on a corpus",
                       description="Train a DeepSeek-style byte-level BPE tokenizer (every byte representable, "
                                   "bos = 0, eos = 1, the DeepSeek chat template) and write tokenizer.json + "
                                   "tokenizer_config.json.\n\nAdvice: 8192 tokens suit a corpus of tens of MB; "
                                   "a bigger vocabulary shortens sequences but adds 2 x hidden_size parameters "
                                   "per token (embedding + lm_head) and needs more data to train them.")
    _corpus_args(t)
    t.add_argument("--out", required=True, metavar="DIR", help="where to write the tokenizer")
    t.add_argument("--vocab-size", type=int, default=8192, help="tokens including 256 bytes and 6 specials "
                                                                 "(default 8192; < 65536 keeps shards 16-bit)")
    t.add_argument("--min-frequency", type=int, default=2, help="ignore merges seen fewer times (default 2)")
    t.add_argument("--val-fraction", type=float, default=0.0,
                   help="leave out the documents `dsv2 data prepare` will hold out with the same value, so the "
                        "tokenizer never sees validation text (default 0: train on everything)")
    t.set_defaults(func=run_tokenizer_train)

    # ---- dsv2 data prepare --------------------------------------------------------------------------------
    data = sub.add_parser("data", help="prepare tokenized training data").add_subparsers(
        dest="data_command", metavar="SUBCOMMAND", required=True)
    d = data.add_parser("prepare", formatter_class=_FORMATTER, help="tokenize a corpus into training shards",
                        description="Tokenize a corpus into memory-mapped shards ([bos] document [eos] ...) with "
                                    "a train / validation split by document (a hash of the file path or JSONL "
                                    "line, so it is stable), and a manifest.json. Streams: the corpus is never "
                                    "held in memory.\n\nAdvice: hold out 1-5% of documents; for code, split by "
                                    "file (the default) so no file is in both splits.")
    _corpus_args(d)
    d.add_argument("--tokenizer", required=True, metavar="DIR", help="a directory with tokenizer.json "
                                                                     "(from `dsv2 tokenizer train` or a model)")
    d.add_argument("--out", required=True, metavar="DIR", help="where to write the shards and manifest.json")
    d.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out (default 0.01)")
    d.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file (default 2^27)")
    d.add_argument("--overwrite", action="store_true", help="replace data already prepared in --out")
    d.set_defaults(func=run_data_prepare)

    # ---- dsv2 train ----------------------------------------------------------------------------------------
    r = sub.add_parser("train", formatter_class=_FORMATTER, help="pretrain a DeepSeek-V2 model (MoE balance "
                                                                 "losses, token dropping, exact resume)",
                       description="Pretrain a DeepSeek-V2 model as the paper does: N(0, 0.006) init, AdamW "
                                   "(0.9, 0.95, wd 0.1), warm-up then step decay x0.316 at 60% and 90%, grad "
                                   "clip 1.0, and the expert / device / communication balance losses.\n\n"
                                   "Advice: on a CPU start with --model tiny-stdlib (or train-small) and "
                                   "--batch-size 16 --seq-len 512; watch the validation loss in the progress bar "
                                   "and `dsv2 plot`. Ctrl-C saves a checkpoint; --resume continues exactly. "
                                   "Every option left out on --resume keeps its value from the run.\n\n"
                                   "Data parallel: launch it with `torchrun --nproc-per-node N $(which dsv2) train "
                                   "...` (gloo on CPU, nccl on CUDA with one GPU per process). --batch-size stays "
                                   "the global batch, split over the N processes, so losses match one process; "
                                   "weights, gradients and optimizer state are sharded (FSDP2) and checkpoints are "
                                   "written sharded, each process its part. --resume works with any N, and from "
                                   "one-process checkpoints too. --expert-parallel K splits the routed experts "
                                   "over groups of K of the processes (all-to-all dispatch), the paper's "
                                   "devices.")
    r.add_argument("--out", metavar="RUN_DIR", help="the run directory (config, metrics.jsonl, checkpoints); "
                                                     "required except with --print-config")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    r.add_argument("--resume-step", type=int, metavar="N",
                   help="continue from the checkpoint of step N instead (implies --resume), e.g. from before a loss "
                        "spike with a lower --lr; metrics and checkpoints past N are moved to RUN_DIR/superseded/")
    r.add_argument("--data", help="a directory from `dsv2 data prepare`")
    r.add_argument("--model", help="a preset (tiny-stdlib, train-small, debug) or a config.json "
                                   "(default tiny-stdlib; vocab and bos/eos follow the data's tokenizer)")
    r.add_argument("--print-config", action="store_true", help="print the model config --model describes and exit")
    g = r.add_argument_group("batch and length")
    g.add_argument("--seq-len", type=int, help="tokens per training window (default 512)")
    g.add_argument("--batch-size", type=int, help="windows per micro-batch (default 16); under torchrun the global "
                                                  "batch, split evenly over the processes")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1); raises the "
                                                  "batch without the memory")
    g.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    g = r.add_argument_group("optimizer and schedule")
    optimizer_args(g, lr="peak learning rate (default 1e-3; the paper's 2.4e-4 is for 236B parameters -- small "
                         "models take 1e-3 to 3e-3)", warmup=100, schedule="step", weight_decay=0.1)
    g.add_argument("--decay-embeddings", action="store_const", const=True,
                   help="also decay the token embeddings (off: rare tokens' rows would shrink between updates)")
    g.add_argument("--decay-router", action="store_const", const=True,
                   help="also decay the router weights (off: decay flattens the routing softmax)")
    g.add_argument("--init-std", type=float, help="std of the N(0, std) init (default: the config's "
                                                  "initializer_range, 0.006 as in the paper)")
    g = r.add_argument_group("MoE balance and token dropping")
    g.add_argument("--aux-expert", type=float, help="alpha_1, expert-level balance (default: the config's "
                                                    "aux_loss_alpha; V2 0.003, V2-Lite 0.001)")
    g.add_argument("--aux-device", type=float, help="alpha_2, device-level balance over n_group devices "
                                                    "(default 0; V2 0.05)")
    g.add_argument("--aux-comm", type=float, help="alpha_3, communication balance, M = topk_group "
                                                  "(default 0; V2 0.02)")
    g.add_argument("--paper-balance", action="store_true", help="the V2 coefficients: 0.003 / 0.05 / 0.02")
    g.add_argument("--capacity-factor", type=float,
                   help="token dropping while training: each device (expert group) keeps at most this x its "
                        "average load, dropping the lowest-affinity tokens (the paper: 1.0; default off). "
                        "Never applied at evaluation")
    g.add_argument("--no-drop-fraction", type=float, help="fraction of sequences never dropped (default 0.1)")
    g = r.add_argument_group("speed and memory")
    g.add_argument("--bf16", action="store_const", const=True, help="bf16 autocast (fp32 weights, optimizer and "
                                                                    "router); faster on GPUs and recent CPUs")
    g.add_argument("--grad-checkpointing", action="store_const", const=True,
                   help="recompute each layer in backward: much less activation memory, ~30%% slower")
    g.add_argument("--device", help="cpu or cuda (default cpu); under torchrun each process takes "
                                    "cuda:LOCAL_RANK")
    g.add_argument("--threads", type=int, help="CPU threads (default: torch's choice, one per core)")
    g.add_argument("--expert-parallel", type=int, metavar="K",
                   help="under torchrun: split each MoE layer's routed experts over groups of K processes (the "
                        "paper's devices), tokens sent to them by all-to-all; the device and communication balance "
                        "losses and token dropping then count those K ranks (set n_group = K for the paper's "
                        "device-limited routing). K divides the processes and the experts (default 1: every "
                        "process holds every expert, FSDP-sharded)")
    g = r.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--log-every", type=int, help="steps per metrics.jsonl record (default 10)")
    g.add_argument("--eval-every", type=int, help="steps between validation losses (default 200)")
    g.add_argument("--eval-batches", type=int, help="validation batches each time (default 8)")
    g.add_argument("--no-final-eval", action="store_const", const=False, dest="final_eval",
                   help="skip the full held-out evaluation (loss, bits per byte) at the end")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default 200)")
    g.add_argument("--keep-checkpoints", type=int, help="newest checkpoints to keep (default 3)")
    g.add_argument("--seed", type=int, help="seed for init, data order and token dropping (default 0)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=run_train)

    # ---- dsv2 export / evaluate / plot -------------------------------------------------------------------
    e = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face model directory",
                       description="Write a training checkpoint (dsv2 train, sft or grpo) as a Hugging Face "
                                   "DeepSeek-V2 directory (config.json, model.safetensors, tokenizer, "
                                   "generation_config.json) that dsv2 and transformers both load. A LoRA run's "
                                   "adapters are merged into its base model's weights, or with --adapter-only "
                                   "written in PEFT's adapter layout (adapter_config.json + "
                                   "adapter_model.safetensors) for PeftModel.from_pretrained.")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("out_dir", metavar="OUT_DIR")
    e.add_argument("--step", type=int, default=None, help="which checkpoint (default: the newest)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weight dtype on disk (default float32, as trained; bfloat16 halves the size)")
    e.add_argument("--adapter-only", action="store_true",
                   help="a LoRA run: write only the adapters, in PEFT's layout (default: merged into the weights)")
    e.set_defaults(func=run_export)

    v = sub.add_parser("evaluate", help="held-out loss and bits per byte of a model on prepared data",
                       description="Next-token loss over a whole split of `dsv2 data prepare` output, in "
                                   "windows of --seq-len, and bits per UTF-8 byte (comparable across tokenizers).")
    v.add_argument("model", metavar="MODEL", help="a Hugging Face DeepSeek-V2 directory (e.g. from dsv2 export)")
    v.add_argument("--data", required=True, help="a directory from `dsv2 data prepare` (same tokenizer)")
    v.add_argument("--split", default="validation", help="train or validation (default validation)")
    v.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    v.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    v.set_defaults(func=run_evaluate)

    pl = sub.add_parser("plot", help="PNG charts of a training run (loss, LR, tokens/s, expert load)",
                        description="Charts from RUN_DIR/metrics.jsonl: train / validation loss, learning rate, "
                                    "tokens/s and a heatmap of each MoE layer's expert load over time. Needs "
                                    "matplotlib (pip install 'dsv2[plot]'). Works while the run is going.")
    pl.add_argument("run_dir", metavar="RUN_DIR")
    pl.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs (default RUN_DIR/plots)")
    pl.set_defaults(func=run_plot)


def run_tokenizer_train(args) -> int:
    from ..train.bpe import train_tokenizer
    from ..train.documents import CorpusStats, is_validation, iter_documents
    stats, held_out = CorpusStats(), []

    def training_texts():
        for key, text in iter_documents(args.inputs, args.text_field, args.include, args.exclude, stats):
            if is_validation(key, args.val_fraction):
                held_out.append(key)
            else:
                yield text

    tok = train_tokenizer(training_texts(), args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    print(f"tokenizer: {tok.vocab_size} tokens from {stats.documents - len(held_out):,} documents"
          + (f" ({len(held_out)} held out)" if held_out else "") + f" -> {args.out}"
          + (f"; skipped: {stats.skipped}" if stats.skipped else ""))
    return 0


def run_data_prepare(args) -> int:
    from ..train.data import prepare
    m = prepare(args.inputs, args.tokenizer, args.out, text_field=args.text_field, val_fraction=args.val_fraction,
                include=args.include, exclude=args.exclude, shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    for split, s in m["splits"].items():
        print(f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes "
              f"in {len(s['shards'])} shard(s)")
    if m["skipped"]:
        print(f"skipped: {m['skipped']}")
    print(f"-> {args.out}/manifest.json ({m['dtype']})")
    return 0


_TRAIN_FIELDS = ("data", "model", "seq_len", "batch_size", "grad_accum", "steps", "lr", "warmup_steps", "schedule",
                 "decay_points", "decay_factor", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip",
                 "decay_embeddings", "decay_router", "init_std", "aux_expert", "aux_device", "aux_comm",
                 "capacity_factor", "no_drop_fraction", "bf16", "grad_checkpointing", "eval_every", "eval_batches",
                 "final_eval", "log_every", "save_every", "keep_checkpoints", "seed", "device", "threads",
                 "expert_parallel")


def run_train(args) -> int:
    from ..parallel.data_parallel import close, world_from_env
    from ..train.loop import train
    from ..train.presets import PRESETS
    from ..train.train_config import TrainConfig
    given = {k: getattr(args, k) for k in _TRAIN_FIELDS if getattr(args, k) is not None}
    if args.paper_balance:
        given = {"aux_expert": 0.003, "aux_device": 0.05, "aux_comm": 0.02, **given}
    if args.print_config:
        from ..config import ModelConfig
        name = given.get("model", "tiny-stdlib")
        cfg = ModelConfig.from_dict(PRESETS[name]) if name in PRESETS else ModelConfig.from_pretrained(name)
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if not args.out:
        raise ValueError("--out RUN_DIR is required: the directory for the run's config, metrics and checkpoints")
    resume = args.resume or args.resume_step is not None
    if resume:
        tc = resumed_settings(TrainConfig.load(args.out), given)
    else:
        if "data" not in given:
            raise ValueError("--data is required for a new run (a directory from `dsv2 data prepare`)")
        tc = TrainConfig(**given)
    world = world_from_env(tc.device)  # launched by torchrun: data parallel over its processes
    main = world is None or world.main
    n = world.size if world is not None else 1
    if resume and tc.expert_parallel > 1 and "expert_parallel" not in given and n % tc.expert_parallel:
        if main:
            print(f"the run was expert-parallel over {tc.expert_parallel} processes; on {n} every process holds "
                  "every expert (pass --expert-parallel K, K dividing the processes, to split them)", file=sys.stderr)
        tc = tc.replace(expert_parallel=1)
    try:
        summary = train(tc, args.out, resume=resume, progress=not args.quiet, resume_step=args.resume_step,
                        world=world)
    except FloatingPointError as e:  # divergence: the message says which checkpoint to go back to
        if main:
            print(f"dsv2 train: error: {e}", file=sys.stderr)
        return 1
    finally:
        close(world)
    if main:
        print(json.dumps(summary))
    return 130 if summary.get("stopped") else 0


def resumed_settings(saved, given: dict):
    """A resumed run's saved settings with the options given on this command line over them (said on stderr: the
    continuation then differs from the original plan)."""
    changed = {k: v for k, v in given.items() if getattr(saved, k) != v}
    if changed:
        print(f"resume with changed settings {changed}: the continuation will differ from the original plan",
              file=sys.stderr)
        saved = saved.replace(**changed)
    return saved


def run_export(args) -> int:
    import torch
    from ..train.export import export
    info = export(args.run_dir, args.out_dir, step=args.step, dtype=getattr(torch, args.dtype),
                  adapter_only=args.adapter_only)
    print(f"step {info['step']} -> {info['out_dir']} ({info['params'] / 1e6:.2f}M "
          f"{'adapter ' if info.get('adapter') else ''}parameters, {info['dtype']}, {info['bytes'] / 1e6:.1f} MB)")
    return 0


def run_evaluate(args) -> int:
    from ..checkpoint import load_model
    from ..train.data import TokenShards
    from ..train.evaluate import evaluate
    from ..progress import Progress
    model = load_model(args.model)
    shards = TokenShards(args.data, args.split)
    out = evaluate(model, shards, args.seq_len, args.batch_size,
                   progress=Progress(shards.tokens, f"evaluating {args.split}", unit="tok"))
    print(json.dumps({"model": args.model, "split": args.split, "seq_len": args.seq_len, **out}))
    return 0


def run_plot(args) -> int:
    from ..train.plot import plot_run
    try:
        files = plot_run(args.run_dir, args.out)
    except ImportError as e:
        print(f"dsv2 plot: {e}", file=sys.stderr)
        return 1
    for f in files:
        print(f)
    return 0
