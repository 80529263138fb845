"""The main job: ``python -m example_app``; see :mod:`example_app.demo`."""

from .demo import main

raise SystemExit(main())
