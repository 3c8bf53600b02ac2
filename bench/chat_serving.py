"""Serving chat from the edited model: time to first token, and edits in chat form.

One ``editd serve`` child process (one torch thread, drift, feeds and the hook back-end
off, MELO only) on a real model with a chat template (SmolLM2-135M-Instruct):

(a) Time to first token. For each of ``--ttft-prompts`` prompts, ``--rounds`` times, on
    ``/v1/chat/completions`` and ``/v1/completions`` (greedy, ``--max-tokens`` tokens):
    a streamed request, timed to its first event that carries text (and to its end);
    a whole request with the same ``max_tokens`` (a client that does not stream sees
    its first token when the whole answer arrives: that is the non-streamed time to
    first token here); a whole request with ``max_tokens = 1`` (the floor: one
    forward of the prompt plus the HTTP round trip). Medians over all requests.

(b) Edits in chat form. Before any edit, each of the first ``--n`` benchmark records'
    prompts is sent once as a chat user turn (the base model's reply: does it already
    name the new target?). Then the records are submitted as MELO edits; for every
    applied edit whose raw completion (``/v1/completions``, greedy, the target's
    tokens plus two) begins with the target, the prompt is sent as the user turn of
    a chat request (``--chat-tokens`` tokens, greedy) and the reply must name the
    target (``reply_mentions``, as ``editd eval`` scores ``chat``). The same request
    streamed must give the same text.

    .venv/bin/python -m bench.chat_serving --model var/models/smollm2-135m-instruct \\
        --edits ../shared/data/counterfact/counterfact-edit.json --format counterfact --n 20

Writes ``bench/results/chat-serving-<model>-<N>.json`` and prints a table. The machine is
shared (2 cores): timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.daemon_process import DaemonProcess, write_config
from bench.inference import edit_records
from bench.stats import REPO, RESULTS, markdown_table, result_header, write_result
from daemon.model.answers import continuation_matches, reply_mentions

RAW_EXTRA_TOKENS = 2


def sections(work: Path, model: Path) -> dict[str, dict[str, Any]]:
    return {
        "model": {"name_or_path": str(model), "threads": 1},
        "store": {"path": str(work / "editd.sqlite3")},
        "checkpoints": {"dir": str(work / "checkpoints")},
        "feeds": {"enabled": False, "spool_dir": str(work / "spool")},
        "drift": {"enabled": False},
        "router": {"backends": ["melo"], "default_backend": "melo"},
        "api": {"max_tokens_limit": 64},
        "log": {"level": "info", "format": "json"},
    }


def chat_body(prompt: str, max_tokens: int, *, stream: bool = False) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def completion_body(prompt: str, max_tokens: int, *, stream: bool = False) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def whole_text(route: str, answer: dict[str, Any]) -> str:
    choice = answer["choices"][0]
    return str(choice["message"]["content"] if route == "chat" else choice["text"])


def post(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """A whole request: its seconds and its JSON."""
    t0 = time.perf_counter()
    r = client.post(url, json=body)
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    return seconds, dict(r.json())


def streamed(
    client: httpx.Client, url: str, route: str, body: dict[str, Any]
) -> tuple[float | None, float, str]:
    """A streamed request: seconds to the first event with text, to the end, and the text."""
    t0 = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            for choice in chunk.get("choices", []):
                text = (
                    (choice.get("delta") or {}).get("content")
                    if route == "chat"
                    else (choice.get("text"))
                )
                if text:
                    pieces.append(text)
                    if first is None:
                        first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, "".join(pieces)


def time_to_first_token(
    daemon: DaemonProcess, prompts: Sequence[str], rounds: int, max_tokens: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    routes = {
        "chat": ("/v1/chat/completions", chat_body),
        "completion": ("/v1/completions", completion_body),
    }
    with httpx.Client(timeout=600) as client:
        for route, (path, body_of) in routes.items():
            url = daemon.url(path)
            post(client, url, body_of(prompts[0], 2))  # warm-up
            first, stream_total, whole, floor, same = [], [], [], [], 0
            for _ in range(rounds):
                for prompt in prompts:
                    t_first, t_end, text = streamed(
                        client, url, route, body_of(prompt, max_tokens, stream=True)
                    )
                    if t_first is not None:
                        first.append(t_first)
                    stream_total.append(t_end)
                    seconds, answer = post(client, url, body_of(prompt, max_tokens))
                    whole.append(seconds)
                    same += whole_text(route, answer) == text
                    floor.append(post(client, url, body_of(prompt, 1))[0])
            out[route] = {
                "requests": len(whole),
                "streamed_first_token_s": round(statistics.median(first), 3),
                "streamed_total_s": round(statistics.median(stream_total), 3),
                "whole_s": round(statistics.median(whole), 3),
                "whole_1_token_s": round(statistics.median(floor), 3),
                "streamed_equals_whole": same,
            }
    return out


def chat_form(
    daemon: DaemonProcess,
    records: Sequence[dict[str, Any]],
    ids: Sequence[str],
    base_replies: Sequence[str],
    chat_tokens: int,
) -> dict[str, Any]:
    recs = daemon.records(ids)
    applied = [(r, i, b) for r, i, b in zip(records, ids, base_replies, strict=True)
               if recs[i]["status"] == "applied"]  # fmt: skip
    held: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    with httpx.Client(timeout=600) as client:
        for record, _edit_id, base in applied:
            prompt, target = record["prompt"], record["target"]
            raw_tokens = len(target.split()) + 3 + RAW_EXTRA_TOKENS
            _, answer = post(
                client, daemon.url("/v1/completions"), completion_body(prompt, raw_tokens)
            )
            raw = whole_text("completion", answer)
            if not continuation_matches(raw, target):
                rows.append({"prompt": prompt, "target": target, "raw": raw, "held": False})
                continue
            url = daemon.url("/v1/chat/completions")
            _, reply_json = post(client, url, chat_body(prompt, chat_tokens))
            reply = whole_text("chat", reply_json)
            body = chat_body(prompt, chat_tokens, stream=True)
            _, _, streamed_reply = streamed(client, url, "chat", body)
            row = {
                "prompt": prompt,
                "target": target,
                "raw": raw,
                "held": True,
                "reply": reply,
                "mentions": reply_mentions(reply, target),
                "base_reply": base,
                "base_mentions": reply_mentions(base, target),
                "streamed_equals_whole": streamed_reply == reply,
            }
            rows.append(row)
            held.append(row)
    hits = sum(r["mentions"] for r in held)
    return {
        "applied": len(applied),
        "held_in_raw_completion": len(held),
        "chat_mentions_target": hits,
        "chat_rate": round(hits / len(held), 3) if held else None,
        "base_chat_mentions_target": sum(r["base_mentions"] for r in held),
        "streamed_equals_whole": sum(r["streamed_equals_whole"] for r in held),
        "rows": rows,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work: Path = args.work
    if work.exists():
        shutil.rmtree(work)
    records = edit_records(args.edits, args.format, args.n)[: args.n]
    requests = [
        {"prompt": r["prompt"], "target": r["target"], "backend": "melo",
         **({"subject": r["subject"]} if r.get("subject") else {})}
        for r in records
    ]  # fmt: skip
    daemon = DaemonProcess(write_config(work, sections(work, args.model)))
    try:
        startup = daemon.start(timeout=3600.0)
        prompts = [r["prompt"] for r in records[: args.ttft_prompts]]
        ttft = time_to_first_token(daemon, prompts, args.rounds, args.max_tokens)
        with httpx.Client(timeout=600) as client:
            base_replies = [
                whole_text(
                    "chat",
                    post(client, daemon.url("/v1/chat/completions"),
                         chat_body(r["prompt"], args.chat_tokens))[1],
                )
                for r in records
            ]  # fmt: skip
        t0 = time.perf_counter()
        ids = daemon.submit(requests)
        daemon.wait_settled(ids, timeout=3600.0)
        apply_s = time.perf_counter() - t0
        chat = chat_form(daemon, records, ids, base_replies, args.chat_tokens)
        return {
            "startup_s": round(startup, 1),
            "apply_s": round(apply_s, 1),
            "time_to_first_token": ttft,
            "chat_form": chat,
        }
    finally:
        daemon.close()


def table(result: dict[str, Any]) -> str:
    ttft = result["time_to_first_token"]
    rows = [
        [route, v["requests"], v["streamed_first_token_s"], v["whole_s"], v["whole_1_token_s"],
         v["streamed_total_s"], v["streamed_equals_whole"]]
        for route, v in ttft.items()
    ]  # fmt: skip
    first = markdown_table(
        ["route", "requests", "streamed: first token s", "whole s", "whole, 1 token s",
         "streamed: total s", "streamed == whole"],
        rows,
    )  # fmt: skip
    chat = result["chat_form"]
    second = markdown_table(
        ["applied", "held in raw completion", "chat names target", "chat rate",
         "base model's chat named it", "streamed == whole"],
        [[chat["applied"], chat["held_in_raw_completion"], chat["chat_mentions_target"],
          chat["chat_rate"], chat["base_chat_mentions_target"], chat["streamed_equals_whole"]]],
    )  # fmt: skip
    return first + "\n\n" + second


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", type=Path, default=REPO / "var/models/smollm2-135m-instruct")
    p.add_argument("--edits", type=Path, required=True)
    p.add_argument("--format", default="counterfact")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--ttft-prompts", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--chat-tokens", type=int, default=24)
    p.add_argument("--work", type=Path, default=REPO / "var/bench-chat-serving")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    result = {**result_header("chat_serving", args, argv), "run": run(args)}
    path = write_result(args.out, f"chat-serving-{args.model.name}-{args.n}.json", result)
    print(table(result["run"]))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
