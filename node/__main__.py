from node.server import main

main()
