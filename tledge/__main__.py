from tledge.cli import main

main()
