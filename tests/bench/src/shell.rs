//! Splitting the shell-quoted command line `cocos-manager --print-qemu-cmd`
//! prints back into an argv.

/// POSIX-shell word splitting for what `shell_quote` produces: plain words,
/// single-quoted words (`'\''` for a quote inside), plus backslash escapes
/// and double quotes for good measure. No expansion of any kind.
pub fn split(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated single quote in {line:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(format!("unterminated double quote in {line:?}")),
                        },
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated double quote in {line:?}")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => {
                    in_word = true;
                    word.push(c);
                }
                None => return Err(format!("trailing backslash in {line:?}")),
            },
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn plain_and_single_quoted() {
        let argv = split("qemu -append 'console=ttyS0 quiet' -x a,b=c\n").expect("split");
        assert_eq!(
            argv,
            ["qemu", "-append", "console=ttyS0 quiet", "-x", "a,b=c"]
        );
    }

    #[test]
    fn quote_inside_single_quotes() {
        assert_eq!(split(r"'it'\''s' ''").expect("split"), ["it's", ""]);
    }

    #[test]
    fn round_trips_the_core_quoting() {
        let argv: Vec<String> = ["a b", "", "x'y", "plain", "$HOME", "tab\there"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let line = cocos_core::qemu::shell_quote(&argv);
        assert_eq!(split(&line).expect("split"), argv);
    }

    #[test]
    fn double_quotes_and_escapes() {
        assert_eq!(
            split(r#""a \"b\" \$c" d\ e"#).expect("split"),
            [r#"a "b" $c"#, "d e"]
        );
    }

    #[test]
    fn unterminated() {
        assert!(split("'abc").is_err());
        assert!(split("\"abc").is_err());
        assert!(split("abc\\").is_err());
    }
}
