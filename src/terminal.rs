//! `talaria chat`: a multi-turn terminal chat that streams the answer as it is generated, keeps
//! the history and understands a few slash commands. It reads any `BufRead`, so it works the
//! same at a terminal and with piped input.

use std::io::{BufRead, Write};

use anyhow::Result;

use crate::chat::{Message, Role};
use crate::engine::{Chatbot, FinishReason, SamplingParams, WriteSink};

pub const HELP: &str = "commands: /reset (forget the conversation), /regenerate (answer the last message again), \
/system TEXT (set the system message; empty to clear), /temperature X, /top_k N (0 = off), /top_p X (1 = off), \
/max_tokens N, /help, /quit";

/// Settings of a chat session.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub sampling: SamplingParams,
    pub seed: u64,
    pub max_new_tokens: usize,
    pub system: Option<String>,
    /// Print prompts and notes meant for a person at a terminal.
    pub interactive: bool,
}

/// A conversation in progress.
pub struct Session<'a> {
    bot: &'a Chatbot,
    pub opts: ChatOptions,
    history: Vec<Message>,
    turn: u64,
}

impl<'a> Session<'a> {
    pub fn new(bot: &'a Chatbot, opts: ChatOptions) -> Self {
        Self {
            bot,
            opts,
            history: vec![],
            turn: 0,
        }
    }

    fn messages(&self) -> Vec<Message> {
        let mut m = vec![];
        if let Some(s) = &self.opts.system {
            m.push(Message::new(Role::System, s.clone()));
        }
        m.extend(self.history.iter().cloned());
        m
    }

    /// Answers the conversation so far (ending with a user turn), streaming to `out`.
    fn reply(&mut self, out: &mut dyn Write) -> Result<()> {
        self.turn += 1;
        let seed = self.opts.seed.wrapping_add(self.turn);
        let mut sink = WriteSink::new(out);
        let show = |piece: &str| sink.piece(piece);
        let (params, max_new) = (&self.opts.sampling, self.opts.max_new_tokens);
        let answer = if self.bot.is_chat() {
            self.bot.answer(&self.messages(), params, seed, max_new, show)?
        } else {
            // A plain completion model continues the last line typed, on its own.
            let line = self.history.last().map_or("", |m| m.content.as_str());
            self.bot.complete(line, params, seed, max_new, show)?
        };
        sink.finish()?;
        writeln!(out)?;
        if self.opts.interactive {
            if answer.dropped_turns > 0 {
                eprintln!(
                    "(the {} oldest exchanges no longer fit the context and were left out)",
                    answer.dropped_turns
                );
            }
            if answer.finish == FinishReason::Length {
                eprintln!(
                    "(stopped at {} tokens; /max_tokens N to change)",
                    self.opts.max_new_tokens
                );
            }
        }
        self.history.push(Message::new(Role::Assistant, answer.text));
        Ok(())
    }

    /// Handles one line of input; returns `false` when the session should end.
    pub fn handle(&mut self, line: &str, out: &mut dyn Write) -> Result<bool> {
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').map_or((cmd, ""), |(n, a)| (n, a.trim()));
            let note = |msg: String| -> Result<()> {
                eprintln!("{msg}");
                Ok(())
            };
            match name {
                "quit" | "exit" => return Ok(false),
                "help" => note(HELP.to_string())?,
                "reset" => {
                    self.history.clear();
                    note("(conversation cleared)".into())?;
                }
                "regenerate" => {
                    if self.history.last().is_some_and(|m| m.role == Role::Assistant) {
                        self.history.pop();
                        self.reply(out)?;
                    } else {
                        note("(nothing to regenerate yet)".into())?;
                    }
                }
                "system" => {
                    self.opts.system = (!arg.is_empty()).then(|| arg.to_string());
                    note(format!(
                        "(system message {})",
                        if arg.is_empty() { "cleared" } else { "set" }
                    ))?;
                }
                "temperature" | "top_k" | "top_p" | "max_tokens" => {
                    if let Err(e) = self.set(name, arg) {
                        note(format!("(invalid {name}: {e})"))?;
                    } else {
                        note(format!("({name} = {arg})"))?;
                    }
                }
                _ => note(format!("(unknown command /{name}; {HELP})"))?,
            }
            return Ok(true);
        }
        if line.trim().is_empty() {
            return Ok(true);
        }
        self.history.push(Message::new(Role::User, line));
        if let Err(e) = self.reply(out) {
            // Keep the history consistent: the unanswered message is dropped.
            self.history.pop();
            eprintln!("error: {e:#}");
        }
        Ok(true)
    }

    fn set(&mut self, name: &str, arg: &str) -> Result<()> {
        let mut p = self.opts.sampling.clone();
        match name {
            "temperature" => p.temperature = arg.parse()?,
            "top_k" => p.top_k = Some(arg.parse::<usize>()?).filter(|&k| k > 0),
            "top_p" => p.top_p = Some(arg.parse::<f64>()?).filter(|&x| x < 1.0),
            "max_tokens" => {
                let n: usize = arg.parse()?;
                anyhow::ensure!(n > 0, "must be positive");
                self.opts.max_new_tokens = n;
            }
            _ => unreachable!("only called for known settings"),
        }
        p.validate()?;
        self.opts.sampling = p;
        Ok(())
    }
}

/// Runs a chat over `input` until end of input or `/quit`.
pub fn run(bot: &Chatbot, opts: ChatOptions, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
    opts.sampling.validate()?;
    let interactive = opts.interactive;
    let mut session = Session::new(bot, opts);
    if !bot.is_chat() {
        eprintln!(
            "note: {}; each line you type is continued on its own",
            crate::engine::NO_CHAT_TEMPLATE
        );
    }
    if interactive {
        eprintln!("Talaria chat. {HELP}");
    }
    let mut line = String::new();
    loop {
        if interactive {
            write!(out, "> ")?;
            out.flush()?;
        }
        line.clear();
        if input.read_line(&mut line)? == 0 || !session.handle(&line, out)? {
            return Ok(());
        }
    }
}
