from node.main import main

main()
