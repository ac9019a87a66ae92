from adapterops.cli import main

main()
