//! Man pages and shell completions generated from the clap definitions of
//! the two binaries (their hidden `generate-man DIR` and
//! `generate-completions DIR` commands; `scripts/package` runs them).
//! Nothing here is used by the gateway at run time.

use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// Write `DIR/<name>.<section>` for `cmd` and one page per visible
/// subcommand, nested ones included (`intragate-user-add.8`), as `git`
/// does. Returns the files written.
pub fn write_man_pages(cmd: Command, section: &str, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    write_page(cmd, section, dir, &mut written)?;
    Ok(written)
}

fn write_page(
    mut cmd: Command,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    cmd.build();
    let name = cmd.get_name().to_string();
    let version = cmd.get_version().unwrap_or_default().to_string();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section(section)
        .source(format!("intragate {version}"))
        .manual("intragate")
        .render(&mut buf)?;
    let path = dir.join(format!("{name}.{section}"));
    std::fs::write(&path, buf)?;
    written.push(path);
    let subs: Vec<Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .cloned()
        .collect();
    for sub in subs {
        let full = format!("{name}-{}", sub.get_name());
        let sub = sub
            .name(full.clone())
            .bin_name(full.replace('-', " "))
            .version(version.clone());
        write_page(sub, section, dir, written)?;
    }
    Ok(())
}

/// Write the bash, zsh and fish completions of `cmd` where Debian's
/// packages keep them, under `dir`: `bash/<name>`, `zsh/_<name>`,
/// `fish/<name>.fish`. Returns the files written.
pub fn write_completions(mut cmd: Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();
    for (shell, sub, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d)?;
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut buf);
        let path = d.join(file);
        std::fs::write(&path, buf)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Command {
        Command::new("demo")
            .version("1.2.3")
            .about("A demo")
            .subcommand(
                Command::new("user")
                    .about("Users")
                    .subcommand(Command::new("add").about("Add one")),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn one_page_per_visible_subcommand() {
        let dir = std::env::temp_dir().join(format!("ig-docgen-{}", std::process::id()));
        let files = write_man_pages(demo(), "8", &dir).expect("man");
        let names: Vec<String> = files
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(names, ["demo.8", "demo-user.8", "demo-user-add.8"]);
        let top = std::fs::read_to_string(dir.join("demo.8")).expect("read");
        assert!(top.contains(".TH demo 8"), "{top}");
        assert!(top.contains("intragate 1.2.3"), "{top}");
        let add = std::fs::read_to_string(dir.join("demo-user-add.8")).expect("read");
        assert!(add.contains("Add one"), "{add}");
        let comp = write_completions(demo(), &dir).expect("completions");
        assert_eq!(comp.len(), 3);
        let bash = std::fs::read_to_string(dir.join("bash/demo")).expect("bash");
        assert!(bash.contains("complete") && bash.contains("user"), "{bash}");
        assert!(dir.join("zsh/_demo").exists() && dir.join("fish/demo.fish").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
