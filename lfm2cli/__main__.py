from lfm2cli.cli import main

main()
