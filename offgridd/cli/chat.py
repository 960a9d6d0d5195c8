"""`offgridd chat`: a terminal chat that streams the answer as it is generated."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from .common import base_url, settings


def stream_reply(url: str, body: dict, key: str | None):
    """Yield content pieces of a streamed chat completion."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for choice in event.get("choices", []):
                if piece := choice.get("delta", {}).get("content"):
                    yield piece


def run_chat(url: str, model: str | None, system: str | None, key: str | None) -> int:
    messages = [{"role": "system", "content": system}] if system else []
    print(f"chatting with {url} (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        messages.append({"role": "user", "content": line})
        body = {"messages": messages, "stream": True, **({"model": model} if model else {})}
        reply = []
        try:
            for piece in stream_reply(url, body, key):
                reply.append(piece)
                print(piece, end="", flush=True)
        except urllib.error.HTTPError as e:
            print(f"\nerror {e.code}: {json.load(e).get('error', {}).get('message', e.reason)}", file=sys.stderr)
            messages.pop()
            continue
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            print(f"\nerror: {getattr(e, 'reason', e)}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_chat(args: argparse.Namespace) -> int:
    return run_chat(base_url(args), args.model, args.system, settings(args).api_key)


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    chat = sub.add_parser("chat", parents=[common], help="chat with the running daemon in the terminal")
    chat.add_argument("--url", help="daemon URL (default from settings)")
    chat.add_argument("--model", help="model name (default: the daemon's)")
    chat.add_argument("--system", help="system message")
    chat.set_defaults(func=cmd_chat)
