"""Soak: the flagship LLM run with remote EnvRunners under repeated faults, against the same run unfaulted.

    python benchmarks/soak.py --minutes 30                                 # the soak: ~30 min unfaulted, then faulted
    python benchmarks/soak.py --tiny --minutes 3 --mean-interval-s 45      # a smoke run on a tiny model built here

First the unfaulted run (``rllib train``, the tuned example with ``--num-env-runners`` remote EnvRunners) trains for
``--minutes`` of training time; its iteration count N is the faulted run's stop. The faulted run (same seed, same
N, ``max_failures: 1000``) stores its results and checkpoints in a size-limited folder: a tmpfs of ``--disk-mb``
mounted here (root only; elsewhere the disk-full fault is left out). A fault injector waits a random time
(exponential, mean ``--mean-interval-s``, seeded by ``--seed``), then injects the next fault of a random order that
covers each kind once per round:

    kill_env_runner     kill -9 of a remote EnvRunner (RLlib restarts it)
    kill_trial          kill -9 of the trial's process (Tune restarts it from its newest checkpoint)
    disk_full           the folder filled but 1 MB just before a checkpoint is due: the checkpoint's copy to storage
                        fails, the trial stops naming it, Tune restarts it; the filler is removed once that is seen
    corrupt_checkpoint  64 bytes of the newest checkpoint garbled once it is written (its size unchanged), then the
                        trial's process killed so that the restore meets it: SPPO refuses it (CRC-32) and restores the
                        one before it

Every checkpoint is checked (``check_checkpoint``: each file's size and CRC-32) as soon as it is written, and each
restore the trial logs (Tune's "Restored ... from checkpoint" and SPPO's refusal naming the one restored instead) is
matched against those checks. Per fault: whether it had its effect and was survived (training went past the
iteration it hit), the iterations and prompts re-done (results reported, then trained again after a trial restart,
from ``result.json``), the iterations without an update (a killed EnvRunner's). At the end both final checkpoints are
evaluated with ``rllib evaluate`` (held-out avg@k). Writes ``<out>.md`` (the tables) and ``<out>.csv`` (the fault log).
"""

import argparse
import csv
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness import provenance

KINDS = ("kill_env_runner", "kill_trial", "disk_full", "corrupt_checkpoint")
FREE_WHEN_FULL = 1 << 20  # what disk_full leaves: room for Tune's result lines, not for a checkpoint


def experiment(args, tiny: str | None, name: str, storage: Path, stop: dict, faulted: bool) -> dict:
    """The tuned example with remote EnvRunners (and, for --tiny, the tiny model and small batches)."""
    (_, exp), = yaml.safe_load(Path(args.yaml).read_text()).items()
    config = {**exp["config"], "seed": args.seed, "num_env_runners": args.num_env_runners,
              "num_cpus_per_env_runner": 1, "num_cpus_for_main_process": 1}
    if tiny:
        config.update({"env_config": {"source": "arithmetic", "size": 100, "heldout_size": 8,
                                      "chat_template_model": tiny},
                       "llm": {"policy": tiny, "engine": "transformers"}, "engine_kwargs": {},  # (vLLM's)
                       "num_envs_per_env_runner": 8,
                       "max_response_tokens": 8, "train_batch_size_per_learner": 8, "minibatch_size": 8,
                       "evaluation_interval": None})
    checkpoints = {**exp.get("checkpoint_config", {}), "num_to_keep": 3}
    if args.checkpoint_frequency:
        checkpoints["checkpoint_frequency"] = args.checkpoint_frequency
    spec = {"run": exp["run"], "env": exp["env"], "stop": stop, "storage_path": str(storage),
            "checkpoint_config": checkpoints, "max_failures": 1000 if faulted else 0, "config": config}
    return {name: spec}


def processes(session: int, title: bytes) -> list[int]:
    """Pids of the Ray processes started under ``session`` whose title starts with ``title``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(title) and os.getsid(int(pid)) == session:
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def read_results(trial: Path | None) -> list[dict]:
    if trial is None or not (trial / "result.json").exists():
        return []
    results = []
    for line in (trial / "result.json").read_text().splitlines():
        try:
            results.append(json.loads(line))
        except ValueError:
            break  # being written
    return results


class Injector:
    """Injects the faults into one running ``rllib train`` (its process group ``session``) and watches its checkpoints."""

    def __init__(self, args, session: int, experiment_dir: Path, storage: Path | None):
        self.rng, self.mean_s, self.session = random.Random(args.seed), args.mean_interval_s, session
        self.experiment_dir, self.storage = experiment_dir, storage
        self.kinds = [k for k in KINDS if storage is not None or k != "disk_full"]
        self.start = time.monotonic()
        self.next_at = self.start + self._interval()
        self.order, self.pending, self.faults = [], None, []
        self.checkpoints = {}  # path -> "intact" | "partial" (as first checked) | "corrupted" (by us)
        self._first_seen = {}

    def _interval(self) -> float:
        return max(0.25 * self.mean_s, self.rng.expovariate(1 / self.mean_s))

    @property
    def trial(self) -> Path | None:
        trials = sorted(self.experiment_dir.glob("SPPO_*"))
        return trials[0] if trials else None

    def _iteration(self) -> int:
        results = read_results(self.trial)
        return results[-1]["training_iteration"] if results else 0

    def _recovered(self) -> bool:
        """The run reported a result since the last fault (each fault meets a running trial, and is costed alone)."""
        results = read_results(self.trial) if self.trial else []
        return bool(results) and (not self.faults or results[-1]["timestamp"] > self.faults[-1]["time"])

    def step(self) -> None:
        self._watch_checkpoints()
        if self.pending:
            self.pending()
        elif time.monotonic() >= self.next_at and not self._recovered():
            self.next_at = time.monotonic() + 5
        elif time.monotonic() >= self.next_at:
            if not self.order:
                self.order = self.rng.sample(self.kinds, len(self.kinds))
            kind = self.order[0]
            if getattr(self, f"_start_{kind}")():
                self.order.pop(0)
                self.next_at = time.monotonic() + self._interval()
            else:  # not possible now (e.g. the trial is restarting): try again shortly
                self.next_at = time.monotonic() + 5

    def _record(self, kind: str, **detail) -> dict:
        fault = {"kind": kind, "at_s": round(time.monotonic() - self.start, 1), "time": time.time(),
                 "iteration": self._iteration(), "effect": None, **detail}
        self.faults.append(fault)
        print(f"soak: {kind} at {fault['at_s']} s, iteration {fault['iteration']} {detail or ''}", flush=True)
        return fault

    def _start_kill_env_runner(self) -> bool:
        pids = processes(self.session, b"ray::LLMEnvRunner")
        if not pids or not self._iteration():
            return False
        pid = self.rng.choice(sorted(pids))
        os.kill(pid, signal.SIGKILL)
        self._record("kill_env_runner", pid=pid)
        return True

    def _kill_trial(self) -> int | None:
        pids = processes(self.session, b"ray::SPPO")
        if len(pids) != 1:
            return None
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def _start_kill_trial(self) -> bool:
        if not self._iteration():
            return False
        pid = self._kill_trial()
        if pid is not None:
            self._record("kill_trial", pid=pid)
        return pid is not None

    def _start_disk_full(self) -> bool:
        trial = self.trial
        if trial is None or not self._iteration():
            return False
        error = trial / "error.txt"

        def failures() -> list[str]:  # the trial's failed checkpoint writes, as Tune recorded them
            lines = error.read_text(errors="replace").splitlines() if error.exists() else []
            return [line for line in lines if "could not be written" in line]

        before = len(failures())
        stat = os.statvfs(self.storage)
        filler = self.storage / "filler"
        size = stat.f_bavail * stat.f_frsize - FREE_WHEN_FULL
        if size <= 0:
            return False
        try:
            with open(filler, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, size)
        except OSError:  # the trial wrote in between: try again shortly
            filler.unlink(missing_ok=True)
            return False
        fault = self._record("disk_full", filled_mb=round(size / 2**20))
        deadline = time.monotonic() + 20 * self.mean_s

        def wait_for_the_failed_write():
            written = failures()
            failed = len(written) > before
            if failed or time.monotonic() > deadline:
                fault["effect"] = "checkpoint write failed" if failed else "no checkpoint write failed"
                if failed:
                    fault["error"] = written[-1][-400:]
                filler.unlink()
                self.pending = None

        self.pending = wait_for_the_failed_write
        return True

    def _start_corrupt_checkpoint(self) -> bool:
        if self.trial is None or not self._iteration():
            return False
        known = set(self.checkpoints)
        fault = self._record("corrupt_checkpoint")

        def wait_for_a_new_checkpoint():
            fresh = [c for c, status in self.checkpoints.items() if c not in known and status == "intact"]
            if not fresh:
                return
            newest = Path(max(fresh))
            victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
            with open(victim, "r+b") as f:  # 64 bytes in the middle of its largest file, the size unchanged
                f.seek(victim.stat().st_size // 2)
                chunk = f.read(64)
                f.seek(victim.stat().st_size // 2)
                f.write(bytes(b ^ 0xFF for b in chunk))
            self.checkpoints[str(newest)] = "corrupted"
            fault.update(checkpoint=newest.name, file=str(victim.relative_to(newest)), pid=self._kill_trial())
            self.pending = None

        self.pending = wait_for_a_new_checkpoint
        return True

    def _watch_checkpoints(self) -> None:
        from rllib_sppo.checkpoints import MANIFEST_FILE, IncompleteCheckpointError, check_checkpoint

        trial = self.trial
        for c in sorted(trial.glob("checkpoint_*")) if trial else []:
            path = str(c)
            if path in self.checkpoints or not (c / MANIFEST_FILE).exists():
                continue
            seen = self._first_seen.setdefault(path, time.monotonic())
            try:
                check_checkpoint(c)
                self.checkpoints[path] = "intact"
            except (IncompleteCheckpointError, OSError):
                if time.monotonic() - seen > 30:  # not completed within 30 s of its manifest: cut short
                    self.checkpoints[path] = "partial"


def run(args, name: str, spec_path: Path, experiment_dir: Path, injector_args=None) -> dict:
    """One ``rllib train`` (its output beside its YAML), with the injector stepping every half second if given."""
    logs = spec_path.with_suffix(".log")
    with open(logs, "w") as log, open(logs.with_suffix(".out"), "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rllib_sppo.cli", "train", "file", str(spec_path)],
                                start_new_session=True, stdout=out, stderr=log)
        injector = Injector(args, proc.pid, experiment_dir, *injector_args) if injector_args is not None else None
        start = time.monotonic()
        try:
            while proc.poll() is None:
                if injector:
                    injector.step()
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if injector:
            injector.step()  # the last checkpoints' checks
    summary = [json.loads(line) for line in logs.with_suffix(".out").read_text().splitlines() if line.startswith("{")]
    trial = next(iter(sorted(experiment_dir.glob("SPPO_*"))), None)
    return {"name": name, "returncode": proc.returncode, "wall_s": time.monotonic() - start, "log": logs,
            "results": read_results(trial), "summary": summary[-1] if summary else {}, "injector": injector}


def restores(log: Path) -> list[dict]:
    """The trial's restores, from its log: the checkpoint Tune asked for, and the one SPPO restored instead of it."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        asked = re.search(r"Restored on \S+ from checkpoint: Checkpoint\(filesystem=\w+, path=([^)]+)\)", line)
        refused = re.search(r"(\S+) is not a complete SPPO checkpoint: (.*); restoring the newest intact earlier "
                            r"checkpoint, (\S+), instead", line)
        if refused:
            found.append({"asked": refused.group(1), "refused_because": refused.group(2), "used": refused.group(3)})
        elif asked:
            if found and found[-1]["asked"] == asked.group(1) and "logged" not in found[-1]:
                found[-1]["logged"] = True  # Tune's line after SPPO's refusal: the same restore
            else:
                found.append({"asked": asked.group(1), "used": asked.group(1), "logged": True})
    return found


def redone(results: list[dict], fault: dict, until: float) -> dict:
    """What a fault cost, from the results between it and the next fault (``until``): after a trial restart (a result
    whose iterations_since_restore is 1) the iterations reported before it and trained again, and their prompts;
    after a killed EnvRunner, the iterations without an update until it sampled again. Survived: training went past
    the iteration it hit."""
    survived = any(r["timestamp"] >= fault["time"] - 1 and r["training_iteration"] > fault["iteration"]
                   for r in results)
    after = [i for i, r in enumerate(results) if fault["time"] - 1 <= r["timestamp"] < until]
    if not after:
        return {"survived": survived}
    first = after[0]
    if fault["kind"] == "kill_env_runner":
        idle = 0
        for r in results[first:]:
            if (r["env_runners"].get("num_env_steps_sampled") or 0) > 0:
                break
            idle += 1
        return {"survived": survived, "iterations_without_update": idle, "iterations_redone": 0, "prompts_redone": 0}
    restart = next((i for i in after if results[i]["iterations_since_restore"] == 1), None)
    if restart is None:
        return {"survived": survived, "iterations_redone": 0, "prompts_redone": 0}
    k = results[restart]["training_iteration"]
    before = results[:restart]
    reached = max(r["training_iteration"] for r in before)
    steps = {r["training_iteration"]: r["env_runners"]["num_env_steps_sampled_lifetime"] for r in before}
    prompts = steps[reached] - steps.get(k - 1, 0)
    return {"survived": survived, "iterations_redone": reached - (k - 1), "prompts_redone": int(prompts)}


def evaluate(checkpoint: str) -> float:
    out = subprocess.run([sys.executable, "-m", "rllib_sppo.cli", "evaluate", checkpoint], capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"rllib evaluate {checkpoint} failed: {out.stderr[-2000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return next(v for k, v in report.items() if k.startswith("accuracy/avg@"))


def mount_limited(folder: Path, megabytes: int) -> Path | None:
    """A tmpfs of ``megabytes`` at ``folder`` (needs root); None where it cannot be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        print("soak: not root: no size-limited folder, so no disk_full faults", flush=True)
        return None
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if out.returncode:
        print(f"soak: cannot mount a tmpfs ({out.stderr.strip()}): no disk_full faults", flush=True)
        return None
    return folder


def main():
    p = argparse.ArgumentParser()
    p.add_argument("yaml", nargs="?", default="tuned_examples/arith_tiny_sppo.yaml")
    p.add_argument("--minutes", type=float, default=30.0, help="training time of the unfaulted run")
    p.add_argument("--mean-interval-s", type=float, default=150.0, help="mean time between faults")
    p.add_argument("--seed", type=int, default=0, help="the runs' seed and the injector's")
    p.add_argument("--num-env-runners", type=int, default=1)
    p.add_argument("--checkpoint-frequency", type=int, help="iterations between checkpoints (default: the YAML's)")
    p.add_argument("--disk-mb", type=int, default=512, help="size of the faulted run's storage folder")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama built here, transformers engine (smoke)")
    p.add_argument("--workdir", help="where the runs write (default: a new temporary folder)")
    p.add_argument("--out", default="benchmarks/results/soak", help="output path stem")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak-")).resolve()
    tiny = None
    if args.tiny:
        from rllib_sppo.llm.assets import build_tiny_llama

        tiny = build_tiny_llama(work / "tiny", seed=0)
    storage = mount_limited(work / "storage", args.disk_mb)
    try:
        reference_spec = work / "reference.yaml"
        reference_spec.write_text(yaml.safe_dump(experiment(
            args, tiny, "reference", work / "reference", {"time_total_s": args.minutes * 60}, False)))
        print(f"soak: unfaulted run, {args.minutes:g} min, in {work}", flush=True)
        reference = run(args, "reference", reference_spec, work / "reference" / "reference")
        n = reference["summary"].get("training_iteration")
        if reference["returncode"] or not n:
            raise SystemExit(f"soak: the unfaulted run failed: see {reference['log']}")
        faulted_spec = work / "faulted.yaml"
        faulted_spec.write_text(yaml.safe_dump(experiment(
            args, tiny, "faulted", storage or work / "storage", {"training_iteration": n}, True)))
        print(f"soak: faulted run to iteration {n}", flush=True)
        faulted = run(args, "faulted", faulted_spec, (storage or work / "storage") / "faulted", (storage,))
        accuracy = {"reference": evaluate(reference["summary"]["checkpoint"]),
                    "faulted": evaluate(faulted["summary"]["checkpoint"]) if faulted["summary"] else math.nan}
        write(args, reference, faulted, accuracy, n)
    finally:
        if storage is not None:
            subprocess.run(["umount", "-l", str(storage)])


def write(args, reference: dict, faulted: dict, accuracy: dict, n: int) -> None:
    injector, results = faulted["injector"], faulted["results"]
    times = [f["time"] for f in injector.faults[1:]] + [math.inf]
    faults = [{**f, **redone(results, f, until)} for f, until in zip(injector.faults, times)]
    seen = restores(faulted["log"])
    status = injector.checkpoints
    for r in seen:
        r["used_status"] = status.get(r["used"], "not seen")
        r["asked_status"] = status.get(r["asked"], "not seen")
    partial_restored = [r for r in seen if r["used_status"] != "intact"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["kind", "at_s", "iteration", "effect", "survived", "iterations_redone", "prompts_redone",
              "iterations_without_update", "pid", "checkpoint", "file", "filled_mb", "error"]
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(faults)

    def mean(values):
        values = [v for v in values if v is not None]
        return f"{sum(values) / len(values):.1f} (max {max(values)})" if values else "-"

    lines = [f"# Soak: {Path(args.yaml).name}{' (tiny model, smoke)' if args.tiny else ''}, "
             f"{args.num_env_runners} remote EnvRunner(s), faults every ~{args.mean_interval_s:g} s", "",
             *provenance(),
             f"Unfaulted run: {reference['wall_s'] / 60:.1f} min, {n} iterations. Faulted run: "
             f"{faulted['wall_s'] / 60:.1f} min to iteration {results[-1]['training_iteration'] if results else 0} "
             f"of {n}, exit code {faulted['returncode']}. Storage of the faulted run: "
             f"{'a tmpfs of ' + str(args.disk_mb) + ' MB' if 'disk_full' in injector.kinds else 'the disk (no disk_full faults)'}.",
             "", "| fault | injected | had its effect | survived | iterations re-done | prompts re-done | "
             "iterations without an update |", "|---|---|---|---|---|---|---|"]
    for kind in injector.kinds:
        mine = [f for f in faults if f["kind"] == kind]
        effect = {"disk_full": lambda f: f["effect"] == "checkpoint write failed",
                  "corrupt_checkpoint": lambda f: f.get("checkpoint") is not None}.get(kind, lambda f: True)
        lines.append(f"| {kind} | {len(mine)} | {sum(map(effect, mine))} | {sum(f.get('survived', False) for f in mine)}"
                     f" | {mean([f.get('iterations_redone') for f in mine])} | "
                     f"{mean([f.get('prompts_redone') for f in mine])} | "
                     f"{mean([f.get('iterations_without_update') for f in mine])} |")
    refused = [r for r in seen if "refused_because" in r]
    lines += ["", f"Final held-out accuracy (`rllib evaluate` of the final checkpoint): faulted "
                  f"{accuracy['faulted']:.3f}, unfaulted {accuracy['reference']:.3f} (same seed, {n} iterations).",
              "", f"Checkpoints written: {len(status)} ({sum(s == 'intact' for s in status.values())} intact when "
                  f"checked, {sum(s == 'partial' for s in status.values())} cut short, "
                  f"{sum(s == 'corrupted' for s in status.values())} corrupted by the injector). Restores: {len(seen)}, "
                  f"of which {len(refused)} refused the checkpoint asked for and restored an earlier one; restores of a "
                  f"checkpoint that was not intact: {len(partial_restored)}."]
    lines += [f"- refused {Path(r['asked']).name} ({r['asked_status']}: {r['refused_because'][:120]}), restored "
              f"{Path(r['used']).name} ({r['used_status']})" for r in refused]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
