fn main() -> std::process::ExitCode {
    pgvault::main()
}
