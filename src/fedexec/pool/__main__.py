from .manager import main

main()
