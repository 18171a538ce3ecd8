"""A tiny train-and-evaluate study, and a fork server for killing it at random moments.

:func:`main` is a complete study (digits logistic regression, 2 epochs, a checkpoint
and an evaluation table every 4 steps) that takes about a second. ``python -m
tests.experiments.tiny_study`` starts a *fork server*: it imports everything once,
then for every JSON request line ``{"out": ..., "kill_after": s, "count": n}`` forks
``n`` children running :func:`main` into ``out``, kills them with ``SIGKILL`` after
``s`` seconds (``null``: never) and answers one JSON line with each child's outcome,
so fault-injection tests pay the import time once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import pandas as pd
import torch

from experiments.common import cli
from experiments.problems import get_problem

STUDY = "tiny"
ARGV = [
    "--problem", "digits_logreg", "--optimizers", "sgd", "--epochs", "2",
    "--batch-size", "32", "--steps", ",".join(str(s) for s in range(0, 89, 4)),
    "--eval-batch-size", "64", "--threads", "1", "--no-progress",
]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate every checkpoint, write ``tiny.csv``; return its path."""
    parser = cli.base_parser(STUDY, __doc__, problem="digits_logreg")
    cli.add_training_args(parser, optimizers="sgd")
    args = parser.parse_args(argv)
    cli.setup(args)
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir)
    inputs, labels = cli.held_out_batch(args, data)

    def evaluate(model, loss_fn, step):
        model.zero_grad()
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        return pd.DataFrame(
            {
                "loss": [loss.item()],
                "param_norm": [params.norm().item()],
                "grad_norm": [grads.norm().item()],
            }
        )

    cli.train_and_tabulate(args, problem, data, STUDY, lambda run: evaluate)
    return {"table": args.out / f"{STUDY}.csv"}


def _child(out: str, error_file: str) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    code = 0
    try:
        main([*ARGV, "--out", out])
    except BaseException:  # report everything to the parent
        with open(error_file, "w") as handle:
            handle.write(traceback.format_exc())
        code = 1
    os._exit(code)


def _serve_one(request: dict) -> list[dict]:
    start, pids = time.perf_counter(), []
    for index in range(request.get("count", 1)):
        error_file = f"{request['out']}.child{index}.err"
        pid = os.fork()
        if pid == 0:
            _child(request["out"], error_file)
        pids.append((pid, error_file))
    kill_after = request.get("kill_after")
    outcomes = []
    for pid, error_file in pids:
        killed = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if kill_after is not None and time.perf_counter() - start > kill_after:
                os.kill(pid, signal.SIGKILL)
                killed = True
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        error = open(error_file).read() if os.path.exists(error_file) else None
        outcomes.append(
            {
                "killed": killed and os.WIFSIGNALED(status),
                "exit": os.waitstatus_to_exitcode(status),
                "error": error,
                "seconds": time.perf_counter() - start,
            }
        )
    return outcomes


def serve() -> None:
    """Answer fork requests from stdin until it closes (see the module doc)."""
    torch.set_num_threads(1)
    get_problem("digits_logreg").load_data()  # import sklearn before forking
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # and dynamo
    print("READY", flush=True)
    for line in sys.stdin:
        print(json.dumps(_serve_one(json.loads(line))), flush=True)


if __name__ == "__main__":
    serve()
