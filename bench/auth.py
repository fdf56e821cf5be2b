"""Authentication cost: small-image push rate with htpasswd (bcrypt) logins vs anonymous.

Every request of an authenticated push carries Basic credentials; bcrypt takes tens of
milliseconds by design, so without the verification cache each request would pay it. This
runs, in alternating rounds on the same machine, one registry-trio with no authentication
and one with an htpasswd file (bcrypt cost ``--bcrypt-rounds``) and an authenticated client,
and prints both rates and their ratio (goal: authenticated >= 90% of anonymous).

Run: ``python bench/auth.py`` (``--json``, ``--help``). It starts both servers itself, with
an htpasswd file it writes; ``--url`` is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import trio
from common import ServerProcess, base_parser, emit_json, machine_info, print_header, push_rate

USER, PASSWORD = "bench", "bench-password"


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        __doc__ or "",
        count=300,
        concurrency=8,
        count_help="images per run",
        no_url="it compares two servers it starts itself, one anonymous and one with an "
        "htpasswd file it writes (with a known password)",
    )
    knobs = parser.add_argument_group("authentication")
    knobs.add_argument("--rounds", type=int, default=2, help="anonymous/authenticated rounds")
    knobs.add_argument(
        "--bcrypt-rounds",
        type=int,
        default=12,
        help="bcrypt cost of the htpasswd entry (default %(default)s)",
    )
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="registry-trio-auth-bench-", dir=args.data_dir))
    htpasswd = directory / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=args.bcrypt_rounds))
    htpasswd.write_text(f"{USER}:{hashed.decode()}\n")
    rates: dict[str, list[float]] = {"anonymous": [], "authenticated": []}
    first_login: list[float] = []
    for round_ in range(args.rounds):
        for mode in ("anonymous", "authenticated"):
            http = (
                {"auth": {"htpasswd": {"path": str(htpasswd)}}} if mode == "authenticated" else {}
            )
            auth = (USER, PASSWORD) if mode == "authenticated" else None
            with ServerProcess(http=http, data_dir=args.data_dir) as server:
                started = time.perf_counter()
                httpx.get(server.url + "/v2/", auth=auth).raise_for_status()
                if auth is not None:
                    first_login.append(time.perf_counter() - started)
                # Untimed warm-up (same for both): steady state is what the rate describes;
                # the one bcrypt a login costs is reported on its own as first_login_ms.
                warm_up = f"warm{mode[:4]}{round_}"
                trio.run(push_rate, server.url, args.concurrency, args.concurrency, warm_up, auth)
                rate = trio.run(
                    push_rate, server.url, args.count, args.concurrency, f"{mode[:4]}{round_}", auth
                )
            rates[mode].append(rate)
    anonymous = sum(rates["anonymous"]) / args.rounds
    authenticated = sum(rates["authenticated"]) / args.rounds
    return {
        "anonymous_images_per_s": round(anonymous, 1),
        "authenticated_images_per_s": round(authenticated, 1),
        "ratio": round(authenticated / anonymous, 3),
        "first_login_ms": round(1000 * sum(first_login) / len(first_login), 1),
        "runs": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "no_progress")}
    machine = machine_info()
    if not args.json:
        print_header("registry-trio authentication benchmark", machine, settings)
    results = run(args)
    if args.json:
        emit_json({"machine": machine, "settings": settings, "results": results})
    else:
        print(f"push, anonymous       {results['anonymous_images_per_s']:>7} images/s")
        print(
            f"push, htpasswd login  {results['authenticated_images_per_s']:>7} images/s "
            f"(ratio {results['ratio']:.2f})   goal >= 0.90"
        )
        print(
            f"first login           {results['first_login_ms']:>7} ms "
            f"(one bcrypt at cost {args.bcrypt_rounds}; then cached for 60 s)"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
