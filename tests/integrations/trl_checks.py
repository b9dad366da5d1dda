"""Runs the TRL example of docs/integrations.md (``sft_multilingual.py``, extracted from the doc
by ``test_trl.py``) under ``torchrun --nproc-per-node 2`` in several configurations and saves,
per rank, what the tests check: the final parameters, ``state.step``, the logs, and the hook's
per-segment diagnostics records (captured before the Trainer's ``log`` summarises and clears
them).

    torchrun --nproc-per-node 2 trl_checks.py EXAMPLE.py WORKDIR
"""

import importlib.util
import os
import sys
import traceback

import torch
import torch.distributed as dist


def load_example(path):
    spec = importlib.util.spec_from_file_location("sft_multilingual", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat(params):
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in params])


def main():
    example, workdir = sys.argv[1], sys.argv[2]
    ex = load_example(example)
    import bucketmoo_kernels.integrations.transformers as hf_integration

    captured = []
    summarise = hf_integration.diagnostics_scalars

    def capture(state, *args, **kwargs):
        log = getattr(state, "diagnostics", None)
        captured.extend({"cosine": r.cosine.clone(), "weights": r.weights.clone()}
                        for r in getattr(log, "records", []))
        return summarise(state, *args, **kwargs)

    hf_integration.diagnostics_scalars = capture
    d = lambda name: os.path.join(workdir, name)  # noqa: E731
    common = ["--packing", "--accumulation", "2", "--max-steps", "4", "--save-steps", "2"]
    scenarios = {
        "none": ["--method", "none", *common, "--output-dir", d("none")],
        "mgda": ["--granularity", "param", *common, "--output-dir", d("mgda")],
        "mgda_resume": ["--granularity", "param", *common, "--output-dir", d("mgda"),
                        "--resume", os.path.join(d("mgda"), "checkpoint-2")],
        "messages": ["--granularity", "param", "--messages", "--max-steps", "2", "--output-dir", d("messages")],
        "lora": ["--granularity", "param", "--lora", "--max-steps", "2", "--output-dir", d("lora")],
    }
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    out = {}
    for name, argv in scenarios.items():
        captured.clear()
        try:
            trainer = ex.main(argv)
            model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
            named = list(model.named_parameters())
            out[name] = {
                "params": flat(p for _, p in named),
                "trainable": flat(p for _, p in named if p.requires_grad),
                "frozen": flat(p for _, p in named if not p.requires_grad) if any(
                    not p.requires_grad for _, p in named) else torch.zeros(0),
                "step": None if trainer.bucket_moo is None else trainer.bucket_moo.step,
                "global_step": trainer.state.global_step,
                "logs": [{k: float(v) for k, v in log.items() if isinstance(v, (int, float))}
                         for log in trainer.state.log_history],
                "records": list(captured),
                "task": trainer.task_plan.task_name(rank),
            }
        except BaseException:  # noqa: BLE001 - the test shows the traceback
            out[name] = {"error": traceback.format_exc()}
        dist.barrier()
    fresh = ex.build_model(ex.build_tokenizer())
    out["initial"] = {"params": flat(fresh.parameters())}
    torch.save(out, os.path.join(workdir, f"results_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
