"""`flowood`: the command-line entry point. Each module registers its commands on the shared app."""

from __future__ import annotations

from flowood_ray.cli import cluster, data, models, scoring, training  # noqa: F401  (they register their commands)
from flowood_ray.cli.common import app
from flowood_ray.cli.glow import glow_app

app.add_typer(glow_app, name="glow")

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
