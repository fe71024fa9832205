pub async fn run(_a: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    todo!()
}
#[derive(clap::Args)]
pub struct DemoArgs {}
