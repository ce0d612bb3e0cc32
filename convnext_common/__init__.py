"""What the project's packages share, on the ground floor (imports nothing of the project).

- `errors`: `InputError`, the base of every failure caused by what a user gave (a
  command line reports it as one `error:` line), and `OutputPathError`;
- `files`: how a file is written (atomically, with the mode `open` would give, no
  temporary file left behind), whether an output path can be written, and how an
  input file is opened (regular files only: never a pipe or a device);
- `jsonable`: values made JSON-safe (the one sanitiser);
- `allocator`: the environment variables that configure the C allocator, and
  glibc's malloc thresholds raised at run time;
- `cpu`: this CPU's instruction-set flags (/proc/cpuinfo), and whether it multiplies
  bfloat16 natively;
- `cli`: the command-line parser, its argument types and the exit policy shared by
  `python -m weights_convert` and `python -m embedding` (interfaces only).
"""
