"""Watch a Hugging Face Trainer run with gradscope: one callback.

Trains a tiny GPT-2 (random initialisation from a config: nothing is downloaded) on byte-level tokens of a real English
text every CPython ships, its documentation topics (``pydoc_data.topics``), and prints gradscope's summary. The
statistics also go to the Trainer's log (``--report-to tensorboard`` to see them there) and the run is saved to
``<output-dir>/gradscope.jsonl`` (``gradscope report hf_trainer_out/gradscope.jsonl --out report`` renders it).

    python examples/hf_trainer.py --steps 40

Needs ``pip install transformers accelerate``.
"""

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradscope.bench.data import ByteWindows
from gradscope.integrations.transformers import GradscopeCallback


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps")
    ap.add_argument("--output-dir", default="hf_trainer_out", help="the Trainer's output_dir (gradscope.jsonl too)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--length", type=int, default=64, help="tokens (bytes) per example")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--every", type=int, default=1, help="collect statistics every N optimizer steps")
    ap.add_argument("--report-to", default="none", help="the Trainer's report_to (tensorboard, wandb, ...)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=64, n_head=4, vocab_size=256, n_positions=args.length,
                        bos_token_id=0, eos_token_id=0)  # byte tokens: GPT-2's 50256 is out of this vocabulary
    model = GPT2LMHeadModel(config)
    train_set = ByteWindows(args.steps * args.batch_size, args.length)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=args.report_to,
        disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(), seed=0)

    callback = GradscopeCallback(every=args.every, raise_on={"nonfinite"})  ###
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, callbacks=[callback])  ###
    trainer.train()

    print(callback.scope.summary())
    last_log = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    logged = [k for k in last_log if k.startswith("gradscope/")]
    print(f"{len(logged)} gradscope values in the last training log, e.g. {sorted(logged)[:3]}")
    print(f"run saved to {Path(args.output_dir) / 'gradscope.jsonl'}")


if __name__ == "__main__":
    main()
