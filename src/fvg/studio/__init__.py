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


def register(app) -> None:
    import typer

    @app.command()
    def studio(
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
        port: int = typer.Option(7860, "--port", help="Port to serve on."),
        preset: Optional[str] = typer.Option(None, "--preset", "-p",
                                             help="Preset selected at start (default: mini)."),
        out: Path = typer.Option(Path("outputs/studio"), "--out", "-o", help="Where each run's folder is saved."),
    ):
        """Open the studio: a local web app to plan, choose the anchor, animate and compare."""
        from rich.console import Console

        from fvg.io import FvgError

        if not 1 <= port <= 65535:
            raise FvgError(f"--port must be between 1 and 65535, got {port}")
        from fvg.studio.session import StudioSession

        session = StudioSession(out, preset)  # FvgError for an unknown preset, before the slow imports
        if importlib.util.find_spec("gradio") is None:
            raise FvgError("the studio needs Gradio: pip install 'fvg[studio]'")
        from fvg.studio.app import serve

        console = Console(stderr=True)
        if host not in LOCAL_HOSTS:
            console.print(f"[yellow]warning:[/] binding to {host}: anyone who can reach this address can use the "
                          "studio (no login) and run models on this machine; prefer an SSH tunnel (docs/studio.md)")
        demo = serve(session, host, port)
        console.print(f"fvg studio on http://{'[' + host + ']' if ':' in host else host}:{port} "
                      f"(preset {session.default_preset}, runs saved in {out}); Ctrl+C stops it", soft_wrap=True)
        demo.block_thread()
