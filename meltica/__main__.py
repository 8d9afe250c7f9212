from meltica.cli import main

main()
