"""Config files of the seed papers' dissections (big_vision style).

Each file defines ``get_config(arg=None)`` returning a
``jaxdissect.config.DissectConfig``; its docstring gives the command that runs
it. ``arg`` picks a variant; every file has ``tiny``, a few images and small
settings with the same method, which the tests reuse (with their own
random-weight model)::

  python -m launch.dissect --config=configs/pnas_places365.py:alexnet
  python -m launch.dissect --config=configs/demo.py:tiny --num_images=64

Flags given on the command line override the file's values.
"""
