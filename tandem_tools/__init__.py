"""Tools, the top floor: the `tandem` command line, benchmarks, the demo, the network emulator, child-process
helpers and training. Contract: may import every floor below; nothing imports it. Transport imports happen inside
commands, so that `tandem --help` and the core-only commands load no server."""
