"""`python -m sftkit ...` is the same as the `sftkit` command (torchrun launches it this way)."""

from sftkit.cli import main

raise SystemExit(main())
