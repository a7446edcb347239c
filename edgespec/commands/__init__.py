"""The ``edgespec`` commands, one module each: ``add_parser(sub)`` and ``run(args)``."""
