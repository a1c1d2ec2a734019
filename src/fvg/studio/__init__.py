"""`fvg studio`: a local web app for the method's loop of refining the anchor.

Type a prompt, edit the planner's first-frame caption, render anchor candidates (or upload
an image), pick one, animate, compare with plain T2V and download the run. The UI lives in
`fvg.studio.app` (Gradio, imported only when the command runs); the logic it calls lives in
`fvg.studio.session` (plain Python over `FactorizedPipeline`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
AUTH_ENV = "FVG_STUDIO_AUTH"


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """"user:password" -> (user, password); None for no value. The password may contain ':'."""
    from fvg.io import FvgError

    if value is None or value == "":
        return None
    user, sep, password = value.partition(":")
    if not sep or not user.strip() or not password:
        raise FvgError(f"--auth / {AUTH_ENV} must be 'user:password' with both parts non-empty")
    return user.strip(), password


def register(app) -> None:
    import typer

    @app.command()
    def studio(
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
        port: int = typer.Option(7860, "--port", help="Port to serve on."),
        preset: Optional[str] = typer.Option(None, "--preset", "-p",
                                             help="Preset selected at start (default: mini)."),
        out: Path = typer.Option(Path("outputs/studio"), "--out", "-o", help="Where each run's folder is saved."),
        auth: Optional[str] = typer.Option(None, "--auth", envvar=AUTH_ENV, show_envvar=True,
                                           help="user:password for a login page (prefer the environment variable: "
                                                "a command line is visible to other users of the machine)."),
        request_timeout: float = typer.Option(600.0, "--request-timeout", min=0.001,
                                              help="Seconds one request may hold the pipeline before it is stopped "
                                                   "(the others wait in a queue behind it)."),
    ):
        """Open the studio: a local web app to plan, choose the anchor, animate and compare."""
        from rich.console import Console

        from fvg.io import FvgError, check_output_dir

        if not 1 <= port <= 65535:
            raise FvgError(f"--port must be between 1 and 65535, got {port}")
        credentials = parse_auth(auth)
        check_output_dir(out)
        from fvg.studio.session import StudioSession

        # FvgError for an unknown preset or a bad limit, before the slow imports
        session = StudioSession(out, preset, request_timeout_s=request_timeout)
        if importlib.util.find_spec("gradio") is None:
            raise FvgError("the studio needs Gradio: pip install 'fvg[studio]'")
        from rich.markup import escape

        from fvg.studio.app import serve

        console = Console(stderr=True)
        if host not in LOCAL_HOSTS and credentials is None:
            console.print(f"[yellow]warning:[/] binding to {escape(host)}: anyone who can reach this address can use "
                          f"the studio (no login: set {AUTH_ENV}=user:password) and run models on this machine; "
                          "prefer an SSH tunnel (docs/studio.md)")
        demo = serve(session, host, port, auth=credentials)
        try:
            shown = f"[{host}]" if ":" in host else host
            login = ", login required" if credentials else ""
            console.print(escape(f"fvg studio on http://{shown}:{port} (preset {session.default_preset}, runs saved "
                                 f"in {out}{login}); Ctrl+C stops it"), soft_wrap=True, highlight=False)
            demo.block_thread()
        finally:
            demo.close()
