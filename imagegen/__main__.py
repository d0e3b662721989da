from imagegen.cli.main import main

main()
