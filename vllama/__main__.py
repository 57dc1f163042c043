from vllama.cli import main

main()
