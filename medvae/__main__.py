from medvae.cli import main

main()
