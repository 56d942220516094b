from openai_forward.cli import main

main()
