"""What distillation costs per optimizer step, against its parts measured in the same run: a plain student step
(ClipTrainer.training_step + AdamW step), a teacher forward (no_grad, the run's precision), and a distillation
step (the same student step with the teacher and --distill_loss), interleaved step by step in one fresh process per
repetition. The
ratio distill / (student + teacher) is the overhead of the distillation term and its gathering; the target is
<= 1.1. The peer row: open_clip's own distillation step (open_clip.model.CLIP student and teacher,
open_clip.loss.DistillClipLoss, contrastive + distill, torch.optim.AdamW), as open_clip_train runs it.

    python bench/distill_speed.py --student tiny-vit --teacher examples/configs/tiny-vit-4layer.json --batch 64
    python bench/distill_speed.py --device cuda --student TinyCLIP-ViT-8M-16-Text-3M --teacher OpenAI-ViT-B-16 \
        --batch 256 --precision bf16
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import bench_main, captions, fmt, interleave, markdown_table, median, run_worker, spread  # noqa: E402

JOBS = ("miniclip", "open_clip")
STEPS = ("student_step", "teacher_forward", "distill_step", "open_clip_distill_step")


def _batch(config, n: int, device, seed: int = 0) -> dict:
    import torch
    from miniclip.tokenizer import get_tokenizer, trim_tokens
    g = torch.Generator().manual_seed(seed)
    size = config.vision_cfg.image_size
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g).to(device),
            **{k: v.to(device) for k, v in trim_tokens(get_tokenizer(config)(captions(n))).items()}}


def _trainer(student, teacher, args):
    import tempfile
    from miniclip.training.trainer import ClipTrainer, ClipTrainingArguments
    targs = ClipTrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=args.device == "cpu", report_to="none",
                                  bf16=args.precision == "bf16", distill_loss=args.loss, disable_tqdm=True,
                                  per_device_train_batch_size=args.batch, remove_unused_columns=False)
    trainer = ClipTrainer(student, targs, teacher=teacher)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _open_clip_step(args, device):
    """open_clip's distillation step (open_clip_train.train.train_one_epoch without the data loader)."""
    import open_clip
    import torch
    from miniclip.config import load_model_config
    s_cfg, t_cfg = load_model_config(args.student), load_model_config(args.teacher)
    student = open_clip.model.CLIP(**s_cfg.open_clip_cfg(), output_dict=True).to(device).train()
    teacher = open_clip.model.CLIP(**t_cfg.open_clip_cfg(), output_dict=True).to(device).eval()
    loss_fn = open_clip.loss.DistillClipLoss()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    size = s_cfg.vision_cfg.image_size
    images = torch.randn(args.batch, 3, size, size).to(device)
    texts = open_clip.get_tokenizer("ViT-B-32")(captions(args.batch)).to(device)  # padded to 77, open_clip's way
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def step():
        with autocast:
            with torch.no_grad():
                t_out = teacher(images, texts)
            s_out = student(images, texts)
            contrastive, distill = loss_fn(s_out["image_features"], s_out["text_features"], s_out["logit_scale"],
                                           t_out["image_features"], t_out["text_features"], t_out["logit_scale"])
            loss = contrastive + distill
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _miniclip_steps(args, device) -> dict:
    """The three miniclip measurements, built in one process: {name: step function}."""
    import torch
    from miniclip.model import MiniClip
    student, teacher = MiniClip(args.student), MiniClip(args.teacher)
    batch = _batch(student.config, args.batch, device)
    if student.config.text_cfg != teacher.config.text_cfg or \
            student.config.vision_cfg.image_size != teacher.config.vision_cfg.image_size:
        batch.update({f"teacher_{k}": v for k, v in _batch(teacher.config, args.batch, device).items()})
    plain = _trainer(student, None, args)
    distill = _trainer(MiniClip(args.student), teacher, args)  # the same initial weights (seeded)

    def student_step(trainer=plain):
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.no_grad(), distill.compute_loss_context_manager():
            distill._teacher_outputs(batch)
    return {"student_step": student_step, "teacher_forward": teacher_forward,
            "distill_step": lambda: student_step(distill)}


def _time(step, device) -> float:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


def worker(job: str, rep: str, args) -> dict:
    """job "miniclip": student step, teacher forward and distill step interleaved step by step in one process (load
    changes hit all three alike, which a ratio of separate processes does not survive on a busy machine);
    job "open_clip": its distillation step."""
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    steps = _miniclip_steps(args, device) if job == "miniclip" else {"open_clip_distill_step": _open_clip_step(args, device)}
    names = list(steps)
    for _ in range(args.warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for i in range(args.steps):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate: nobody always runs first
        for name in order:
            times[name].append(_time(steps[name], device))
    return {f"{name}_ms": sorted(t)[len(t) // 2] for name, t in times.items()}


def add_args(p) -> None:
    p.add_argument("--student", default="tiny-vit")
    p.add_argument("--teacher", default=str(Path(__file__).resolve().parent.parent / "examples/configs/tiny-vit-4layer.json"))
    p.add_argument("--loss", default="affinity", choices=["affinity", "kd", "feature"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])


def measure_all(args) -> dict:
    flags = ["--student", args.student, "--teacher", args.teacher, "--loss", args.loss, "--batch", str(args.batch),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
             "--device", args.device, "--precision", args.precision]
    return interleave([(job,) for job in JOBS], args.reps,
                      lambda job, rep: run_worker(Path(__file__), ["--worker", job[0], str(rep), *flags], args.threads))


def table(results: dict, args) -> str:
    runs = results[("miniclip",)] + results[("open_clip",)]
    ms = {name: median(runs, f"{name}_ms") for name in STEPS}
    parts = ms["student_step"] + ms["teacher_forward"]
    rows = [[name, fmt(ms[name], 1), spread(runs, f"{name}_ms")] for name in STEPS]
    rows.append(["student step + teacher forward", fmt(parts, 1), "-"])
    ratio = ms["distill_step"] / parts
    return (f"student {args.student}, teacher {Path(args.teacher).name}, distill_loss {args.loss}, batch {args.batch}, "
            f"{args.precision}, {args.device}; medians over {args.reps} processes x {args.steps} steps\n\n"
            + markdown_table(["step", "median ms", "min-max of process medians"], rows)
            + f"\n\ndistill step / (student step + teacher forward) = {ratio:.3f} (target <= 1.1)\n"
            f"miniclip distill step / open_clip distill step = {ms['distill_step'] / ms['open_clip_distill_step']:.3f}\n")


if __name__ == "__main__":
    bench_main(__doc__, add_args, worker, measure_all, table, ("JOB", "REP"))
