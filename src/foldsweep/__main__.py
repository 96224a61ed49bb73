from foldsweep.cli import main

main()
