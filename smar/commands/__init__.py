"""The code of the ``smar`` commands that are more than a call: their options, their checks and
their output (``analyze``, ``retention``). :mod:`smar.cli` wires them up."""
