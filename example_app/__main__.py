"""The main job: ``python -m example_app``. See :mod:`example_app.demo`."""

from .demo import main

raise SystemExit(main())
