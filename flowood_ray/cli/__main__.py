"""`python -m flowood_ray.cli`: the same as the `flowood` command."""

from flowood_ray.cli import main

main()
