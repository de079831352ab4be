"""CLI commands of the runtime: `serve`, `generate`, `demo` (registered in splitllm.cli).

Plain typed functions with typer annotations; torch and transformers are imported inside them so
that `splitllm --help` stays fast.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from splitllm.errors import UserError

if TYPE_CHECKING:
    from splitllm.runtime.autoplace import AutoPlan
    from splitllm.runtime.client import Session
    from splitllm.runtime.models import LoadedModel
    from splitllm.runtime.protocol import Sampling

TOKEN_ENV = "SPLITLLM_TOKEN"
EXIT_INTERRUPTED = 3  # `generate`: the server was lost mid-generation (partial result)

# Options several commands take, declared once: --model (all), the rest (`generate`, `proxy`).
ModelOption = Annotated[str, typer.Option(
    help="'smollm2' (built in) or a local HF directory (a client loads its server's model).")]
TokenOption = Annotated[str | None, typer.Option(
    envvar=TOKEN_ENV, help="The server's bearer token.")]
WireDtypeOption = Annotated[str, typer.Option(help="Hidden states on the wire: fp32, bf16, fp16.")]
ClientThreadsOption = Annotated[int | None, typer.Option(
    help="Torch threads of this client (default: half the cores).")]
ClientDtypeOption = Annotated[str, typer.Option(help="Weights: float32, bf16 or fp16.")]
SlowdownOption = Annotated[float, typer.Option(
    help="EMULATION: client units take this many times longer.")]
EmulateLinkOption = Annotated[str | None, typer.Option(
    help="EMULATION: shape the link to the server like 4g, 5g, wifi or lan.")]


def default_threads() -> int:
    """Half the cores this process may run on (a `taskset` pins it): client and server often
    share one machine, and a thread more than its cores only makes each step wait."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


def serve(
    model: ModelOption = "smollm2",
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless told).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one, printed).")] = 8765,
    token: Annotated[list[str] | None, typer.Option(
        envvar=TOKEN_ENV, help="Require a bearer token of every client; repeat it for several "
                               "(each with its own quotas).")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="More tokens, one per line (blank lines and # comments skipped).")] = None,
    compute: Annotated[str, typer.Option(
        help="Where the engine computes: cpu, cuda or auto (cuda when available).")] = "auto",
    dtype: Annotated[str | None, typer.Option(
        help="Weights: float32, bf16 or fp16 (default: float32 on cpu, bf16 on cuda).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="Torch threads for model compute (default: half the cores).")] = None,
    max_batch_tokens: Annotated[int, typer.Option(
        help="Token positions one engine step may take (prompts are chunked to fit).")] = 512,
    max_batch_rows: Annotated[int, typer.Option(
        help="Forwards one engine step may take (1 = one session at a time).")] = 64,
    max_sessions: Annotated[int, typer.Option(help="Open sessions allowed in total.")] = 64,
    max_sessions_per_connection: Annotated[int, typer.Option(
        help="Open sessions one connection may hold.")] = 8,
    max_in_flight_per_connection: Annotated[int, typer.Option(
        help="Forwards one connection may have queued or running at once.")] = 8,
    max_sessions_per_token: Annotated[int | None, typer.Option(
        help="Open sessions all connections of one token may hold (default: --max-sessions "
             "shared equally between the tokens).")] = None,
    max_in_flight_per_token: Annotated[int | None, typer.Option(
        help="Forwards all connections of one token may have queued or running (default: "
             "its sessions).")] = None,
    max_kv_mib: Annotated[float | None, typer.Option(
        help="KV cache of all sessions together, MiB (default: half the compute device's "
             "memory); a forward that would pass it gets 'over_capacity'.")] = None,
    idle_timeout_s: Annotated[float, typer.Option(
        help="Close sessions silent this long, seconds.")] = 300.0,
    max_frame_mib: Annotated[float, typer.Option(help="Largest WebSocket frame, MiB.")] = 64.0,
    message_timeout_s: Annotated[float, typer.Option(
        help="A message must be complete this long after its first byte, seconds.")] = 60.0,
    max_unfinished_mib: Annotated[float, typer.Option(
        help="Unfinished messages of all connections together, MiB (the connection that "
             "would pass it is closed, code 1013).")] = 256.0,
    max_tokens_per_message: Annotated[int, typer.Option(
        help="Most tokens one forward may carry (clients chunk longer prompts).")] = 1024,
    announce_device: Annotated[str, typer.Option(
        help="What clients' auto placement assumes of this server: 'measured' (time the "
             "units at start) or a device preset name.")] = "measured",
    device: Annotated[str | None, typer.Option(
        hidden=True, help="Deprecated name of --announce-device.")] = None,
) -> None:
    """Serve split inference: a WebSocket for sessions, /health, /v1/info, /metrics."""
    from splitllm.runtime.engine import EngineConfig
    from splitllm.runtime.guards import TransportLimits
    from splitllm.runtime.hosting import serve_forever
    from splitllm.runtime.models import load_model
    from splitllm.runtime.server_state import ServerConfig
    from splitllm.runtime.session import Limits

    unset = 1  # an optional limit left to its default passes the check
    counts = [max_sessions, max_sessions_per_connection, max_in_flight_per_connection,
              max_batch_tokens, max_batch_rows,
              unset if max_sessions_per_token is None else max_sessions_per_token,
              unset if max_in_flight_per_token is None else max_in_flight_per_token]
    amounts = [idle_timeout_s, max_frame_mib, unset if max_kv_mib is None else max_kv_mib,
               message_timeout_s, max_unfinished_mib]
    if min(counts) < 1 or not min(amounts) > 0:
        raise UserError("--max-sessions, --max-sessions-per-connection, "
                        "--max-in-flight-per-connection, --max-batch-tokens, --max-batch-rows, "
                        "--max-sessions-per-token, --max-in-flight-per-token, --idle-timeout-s, "
                        "--max-frame-mib, --max-kv-mib, --message-timeout-s and "
                        "--max-unfinished-mib must be positive")
    tokens = server_tokens(token or [], token_file)
    if device is not None:
        print("splitllm: --device is deprecated: use --announce-device (what clients' auto "
              "placement assumes; --compute picks where the server computes)", file=sys.stderr)
        announce_device = device
    if announce_device != "measured":
        from splitllm.planner.hardware import device_preset

        device_preset(announce_device)  # fail now on a bad name, not at a client's auto placement
    target = compute_device(compute)
    config = ServerConfig(
        tokens=tokens, max_sessions=max_sessions, idle_timeout_s=idle_timeout_s,
        max_sessions_per_connection=max_sessions_per_connection,
        max_in_flight_per_connection=max_in_flight_per_connection,
        max_sessions_per_token=max_sessions_per_token,
        max_in_flight_per_token=max_in_flight_per_token,
        transport=TransportLimits(message_timeout_s=message_timeout_s,
                                  max_unfinished_bytes=int(max_unfinished_mib * 2**20)),
        max_kv_bytes=None if max_kv_mib is None else int(max_kv_mib * 2**20),
        max_frame_bytes=int(max_frame_mib * 2**20),
        limits=Limits(max_tokens_per_message=max_tokens_per_message),
        threads=threads or default_threads(),
        engine=EngineConfig(max_batch_tokens=max_batch_tokens, max_batch_rows=max_batch_rows),
        profile=announce_device == "measured", announce_device=announce_device,
    )
    loaded = load_model(model, dtype or ("bf16" if target == "cuda" else "float32"))
    weights: Any = loaded.model  # transformers types .to() oddly
    weights.to(target)
    listener = _listening(host, port)  # now, not after the units and steps are timed
    auth = f"bearer token required ({len(tokens)} tokens)" if tokens else "no token"
    if not tokens and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"splitllm: WARNING: serving on {host} without --token: anyone who can reach it "
              "can use it", file=sys.stderr)
    print(f"splitllm: serving {loaded.model_id} ({loaded.dtype} on {target}, {config.threads} "
          f"threads) on ws://{host}:{listener.getsockname()[1]}, {auth}", file=sys.stderr,
          flush=True)
    with listener:
        serve_forever(loaded, listener, config)


def _listening(host: str, port: int) -> socket.socket:
    """The command's listening socket, bound before its start-up work (a port in use: one
    line, exit code 2)."""
    from splitllm.runtime.hosting import listening_socket

    try:
        return listening_socket(host, port)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def server_tokens(given: list[str], token_file: Path | None) -> tuple[str, ...]:
    """The tokens of --token and --token-file, each once; UserError for an unreadable file or
    an empty token."""
    tokens = list(given)
    if token_file is not None:
        try:
            lines = token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--token-file {token_file}: cannot read it ({exc})") from None
        tokens += [line.strip() for line in lines
                   if line.strip() and not line.lstrip().startswith("#")]
        if len(tokens) == len(given):
            raise UserError(f"--token-file {token_file}: no tokens in it")
    if any(not token.strip() or token != token.strip() for token in tokens):
        raise UserError("--token: a token must not be empty or begin or end with a space")
    return tuple(dict.fromkeys(tokens))


def compute_device(compute: str) -> str:
    """'cpu' or 'cuda' for --compute cpu|cuda|auto; UserError if CUDA is asked for but absent."""
    import torch

    if compute not in ("cpu", "cuda", "auto"):
        raise UserError(f"--compute {compute!r}: use cpu, cuda or auto")
    if compute == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if compute == "cuda" and not torch.cuda.is_available():
        raise UserError("--compute cuda: no CUDA device is available here (use --compute cpu)")
    return compute


def generate_command(
    prompt: Annotated[str, typer.Option(help="The prompt (wrapped in the chat template).")],
    server: Annotated[list[str] | None, typer.Option(
        help="Server URL (default ws://127.0.0.1:8765); repeat it to fail over in order.")
                      ] = None,
    placement: Annotated[str, typer.Option(
        help="'auto' (ask the planner) or one letter per unit, C or S, e.g. CCSS...S.")
                         ] = "auto",
    model: ModelOption = "smollm2",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    local: Annotated[bool, typer.Option(
        "--local", help="Run the unsplit model in-process (the reference), no server.")
                     ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")
                       ] = False,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    wire_dtype: WireDtypeOption = "fp32",
    token: TokenOption = None,
    timeout_s: Annotated[float, typer.Option(
        help="A server that does not reply (or connect) within this many seconds is lost.")
                         ] = 120.0,
    retry_s: Annotated[float, typer.Option(
        help="After losing the server: reconnect (backoff, servers in order) and replay for "
             "up to this many seconds, then stop with the partial result.")] = 30.0,
    sla_s: Annotated[float | None, typer.Option(
        help="Latency SLA for auto placement (default: 1.5x the faster uniform placement).")
                     ] = None,
    headroom: Annotated[float | None, typer.Option(
        help="Auto placement plans within (1 - headroom) x the SLA where a placement is that "
             "fast (a margin for steps slower than predicted), else within the SLA "
             "[default: 0.1].")] = None,
    client_device: Annotated[str, typer.Option(
        help="Auto placement: 'measured' (time this client) or a device preset.")
                             ] = "measured",
    server_device: Annotated[str | None, typer.Option(
        help="Auto placement: override what the server announces (a device preset).")] = None,
    emulate_client_slowdown: SlowdownOption = 1.0,
    emulate_link: EmulateLinkOption = None,
    prefill_chunk: Annotated[int, typer.Option(help="Prompt tokens per forward message.")
                             ] = 512,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
    threads: ClientThreadsOption = None,
    dtype: ClientDtypeOption = "float32",
    speculate: Annotated[str, typer.Option(
        help="Speculative decoding: prompt-lookup draft tokens per pass, or 'auto'.")
                         ] = "0",
) -> None:
    """Generate text with a split between this client and a server, streaming tokens."""
    import torch

    from splitllm.placement import Placement
    from splitllm.runtime.models import checked_prompt, load_model
    from splitllm.runtime.protocol import ProtocolError, Sampling, wire_dtype_name
    from splitllm.runtime.units import UnitStack

    if max_new_tokens < 1 or prefill_chunk < 1:
        raise UserError("--max-new-tokens and --prefill-chunk must be at least 1")
    try:
        wire = wire_dtype_name(wire_dtype)
        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
    except (ProtocolError, ValueError) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    drafts = _draft_tokens(speculate, local)
    torch.set_num_threads(threads or default_threads())
    loaded = load_model(model, dtype)
    ids = checked_prompt(loaded, prompt, not raw, max_new_tokens)
    if placement.lower() != "auto":  # before connecting: a typo is the user's to fix first
        Placement.parse(placement, UnitStack(loaded.model).n_units)
    on_text = None if as_json else _print_text
    if local:
        result = _generate_local(loaded, ids, max_new_tokens, sampling, on_text)
    else:
        from splitllm.runtime.autoplace import DEFAULT_HEADROOM
        from splitllm.runtime.client import DEFAULT_SERVER, GenerationInterrupted, connect
        from splitllm.runtime.transport import ServerError

        try:
            with connect(server or [DEFAULT_SERVER], loaded, token=token,
                         wire_dtype=wire, emulate_link=emulate_link,
                         emulate_client_slowdown=emulate_client_slowdown, timeout_s=timeout_s,
                         retry_s=retry_s) as session:
                if session.emulation:
                    print(f"splitllm: {session.emulation}", file=sys.stderr, flush=True)
                plans: list[AutoPlan] = []

                def on_plan(auto: AutoPlan) -> None:
                    _print_plan(auto)
                    plans.append(auto)

                result = session.generate(ids, max_new_tokens, placement=placement,
                                          sampling=sampling, sla_s=sla_s,
                                          headroom=DEFAULT_HEADROOM if headroom is None
                                          else headroom,
                                          client_device=client_device,
                                          server_device=server_device,
                                          prefill_chunk=prefill_chunk, on_plan=on_plan,
                                          on_text=on_text, speculate=drafts,
                                          on_notice=_print_notice).to_json()
                for auto in plans:  # what the auto placement promised, beside what it did
                    result |= _promise(session, auto, len(ids), max_new_tokens, client_device,
                                       server_device)
        except GenerationInterrupted as exc:
            print(json.dumps(exc.partial.to_json()) if as_json else "", flush=True)
            print(f"error: generation interrupted after {len(exc.partial.tokens)} tokens: {exc}",
                  file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except ServerError as exc:
            raise UserError(f"server: {exc}") from None
    _print_result(result, as_json)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result), flush=True)
        return
    print()
    tokens = len(result["tokens"])
    rate = tokens / result["wall_s"] if result["wall_s"] > 0 else 0.0
    print(f"splitllm: {tokens} tokens, placement {result['placement']}, TTFT "
          f"{result['ttft_s']:.3f} s, TPOT {result['tpot_s'] * 1e3:.1f} ms, "
          f"{rate:.1f} tokens/s, {result.get('round_trips', 0)} round trips"
          + (f", {result['accepted']}/{result['drafted']} drafts accepted"
             if result.get("drafted") else ""), file=sys.stderr)


def _print_notice(line: str) -> None:
    print(f"splitllm: {line}", file=sys.stderr, flush=True)


def _draft_tokens(speculate: str, local: bool) -> int | str:
    """--speculate as the client takes it: a count of draft tokens >= 0, or 'auto'."""
    from splitllm.runtime.speculative import AUTO, MAX_DRAFT_TOKENS

    text = speculate.strip().lower()
    if text != AUTO and not (text.isdigit() and int(text) <= MAX_DRAFT_TOKENS):
        raise UserError(f"--speculate must be 'auto' or a number of draft tokens from 0 to "
                        f"{MAX_DRAFT_TOKENS}, not {speculate!r}")
    drafts: int | str = text if text == AUTO else int(text)
    if drafts != 0 and local:
        raise UserError("--speculate runs over a split: leave out --local")
    return drafts


def _promise(session: Session, auto: AutoPlan, prompt_tokens: int, new_tokens: int,
             client_device: str, server_device: str | None) -> dict[str, object]:
    """What an auto placement promised: its SLA and the predicted figures (`--json`), for
    `new_tokens` tokens (--max-new-tokens: an EOS before them ends the generation sooner)."""
    from dataclasses import asdict

    from splitllm.runtime.fidelity import promised

    figures = asdict(promised(session, auto.plan.placement, prompt_tokens, new_tokens,
                              whole=auto.instance, client_device=client_device,
                              server_device=server_device))
    return {"sla_s": auto.instance.sla_s, "headroom": auto.headroom,
            "predicted": {"new_tokens": new_tokens,
                          **{k: figures[k] for k in ("ttft_s", "tpot_s", "e2e_s", "server_cpu_s")}}}


def _print_plan(auto: AutoPlan) -> None:
    print(f"splitllm: auto placement {auto.plan.placement} ({auto.source}; predicted "
          f"{auto.plan.latency_s:.2f} s, SLA {auto.instance.sla_s:.2f} s, planned within "
          f"{(1 - auto.headroom) * auto.instance.sla_s:.2f} s)",
          file=sys.stderr, flush=True)


def _print_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _generate_local(loaded: LoadedModel, ids: list[int], max_new_tokens: int, sampling: Sampling,
                    on_text: Callable[[str], None] | None) -> dict[str, Any]:
    """The unsplit reference run, in the same JSON shape as a split run."""
    from splitllm.runtime.decoding import LocalPipe, timed_generation
    from splitllm.runtime.textstream import TextStream

    stream = TextStream(loaded, on_text)
    timed = timed_generation(LocalPipe(loaded.model, sampling), ids, max_new_tokens,
                             eos_token_ids=loaded.eos_token_ids, on_token=stream.push)
    stream.finish()
    return {"tokens": list(timed.tokens), "text": stream.text, "placement": "local",
            "ttft_s": timed.ttft_s, "tpot_s": timed.tpot_s, "wall_s": timed.wall_s,
            "prompt_tokens": len(ids)}


DEMO_PROMPT = ("Rewrite this text in plain words, keeping its sentences: The city council met "
               "on Tuesday to discuss the new bicycle lanes on Main Street. Shop owners said the "
               "lanes hurt their business; cyclists said the lanes made their commute safer.")


def demo(
    prompt: Annotated[str, typer.Option(help="What to ask the model.")] = DEMO_PROMPT,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    link: Annotated[str, typer.Option(help="EMULATED link: 4g, 5g, wifi or lan.")] = "4g",
    client_slowdown: Annotated[float, typer.Option(
        help="EMULATED phone: its units take this many times longer than on this CPU.")
                               ] = 4.0,
    sla_factor: Annotated[float, typer.Option(
        help="SLA as a multiple of the server-only latency the planner predicts.")] = 1.3,
    model: ModelOption = "smollm2",
    speculate: Annotated[int, typer.Option(
        help="Prompt-lookup drafts per pass in the speculation part (0: skip it).")] = 4,
) -> None:
    """Plan and run a real split for an emulated phone on an emulated 4G link, then report."""
    from splitllm.runtime.demo import DemoOptions, run_demo

    if max_new_tokens < 1 or client_slowdown < 1 or not sla_factor > 0 or not 0 <= speculate <= 8:
        raise UserError("--max-new-tokens >= 1, --client-slowdown >= 1, --sla-factor > 0, "
                        "--speculate from 0 to 8")
    run_demo(DemoOptions(prompt, max_new_tokens, link, client_slowdown, sla_factor, model,
                         speculate))


def proxy(
    server: Annotated[str, typer.Option(help="The splitllm server, ws://HOST:PORT.")
                      ] = "ws://127.0.0.1:8765",
    listen: Annotated[str, typer.Option(
        help="HOST:PORT to serve the OpenAI API on (port 0: any free one, printed).")
                      ] = "127.0.0.1:8080",
    model: ModelOption = "smollm2",
    token: TokenOption = None,
    wire_dtype: WireDtypeOption = "fp32",
    threads: ClientThreadsOption = None,
    dtype: ClientDtypeOption = "float32",
    placement: Annotated[str, typer.Option(
        help="'auto' (the planner, per request) or one fixed placement, e.g. CCSS...S.")
                         ] = "auto",
    emulate_client_slowdown: SlowdownOption = 1.0,
    emulate_link: EmulateLinkOption = None,
) -> None:
    """Serve the OpenAI API locally; each request runs split with a server (placement auto)."""
    import torch

    from splitllm.runtime.models import load_model
    from splitllm.runtime.protocol import ProtocolError, wire_dtype_name
    from splitllm.runtime.proxy import ProxyConfig, run_proxy

    host, _, port_text = listen.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise UserError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    try:
        wire = wire_dtype_name(wire_dtype)
    except ProtocolError as exc:
        raise UserError(str(exc)) from None
    torch.set_num_threads(threads or default_threads())
    loaded = load_model(model, dtype)
    listener = _listening(host.strip("[]"), int(port_text))  # before connecting and measuring
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"splitllm: WARNING: the proxy on {host} has no token of its own: anyone who can "
              "reach it can use the server's token through it", file=sys.stderr)
    print(f"splitllm: connecting to {server}, measuring the link and this machine...",
          file=sys.stderr, flush=True)
    config = ProxyConfig(server=server, token=token, wire_dtype=wire, placement=placement,
                         emulate_link=emulate_link,
                         emulate_client_slowdown=emulate_client_slowdown)
    bound = f"{host}:{listener.getsockname()[1]}"
    with listener:
        run_proxy(loaded, config, listener,
                  ready=lambda: print(f"splitllm: OpenAI API for {loaded.model_id} on "
                                      f"http://{bound}/v1 (split with {server})",
                                      file=sys.stderr, flush=True))
