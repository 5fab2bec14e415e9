//! The federated Shakespeare benchmark (McMahan et al. 2017; LEAF): one
//! client per (play, speaking role), built from the plays' plain text.
//!
//! A play's text has a title block and the list of persons, then acts and
//! scenes. Each speech starts with its speaker's name or abbreviation alone
//! on a line (`Ham.`, `OTHELLO.`), followed by the speech's lines; stage
//! directions stand in `[...]`. Every spoken line is one of its role's
//! lines. Roles with at least 2 lines are kept; each role's first 80% of
//! lines train and the last 20% test.

use std::{collections::BTreeMap, path::Path};

use super::text::{Document, TextData, TextError};

/// One speaking role of one play, with its lines split for training.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    pub play: String,
    pub name: String,
    pub train: Vec<String>,
    pub test: Vec<String>,
}

impl Role {
    /// The role as a device's data: its training lines as one document and
    /// its test lines as its held-out one.
    pub fn text_data(&self) -> TextData {
        let doc = |lines: &[String], part: &str| Document {
            source: format!("{}/{} ({part})", self.play, self.name),
            text: lines.join("\n"),
        };
        TextData {
            train: vec![doc(&self.train, "train")],
            heldout: vec![doc(&self.test, "test")],
        }
    }
}

/// A line naming who speaks next, or `None`.
fn speaker(line: &str, prev_blank: bool, next: Option<&str>) -> Option<String> {
    let t = line.trim();
    let name = t.strip_suffix('.')?.trim();
    if name.is_empty() || t.len() > 40 || name.split_whitespace().count() > 4 {
        return None;
    }
    let first = name.chars().next()?;
    if !(first.is_ascii_uppercase() || first.is_ascii_digit()) {
        return None;
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " '&-.".contains(c))
    {
        return None;
    }
    let upper = name.starts_with("ACT") || name.starts_with("SCENE");
    if upper || name.starts_with("Scene ") || name.starts_with("Act ") {
        return None;
    }
    let next = next.map(str::trim).unwrap_or("");
    if next.is_empty() || next.starts_with('[') {
        return None;
    }
    let shouted = name.chars().all(|c| !c.is_ascii_lowercase());
    (prev_blank || shouted).then(|| name.to_uppercase())
}

/// Removes `[...]` stage directions from a spoken line.
fn spoken(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut depth = 0usize;
    for c in line.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every role of one play with its spoken lines, in order of appearance of
/// the roles' first line. A text with no act (a poem) has none.
pub fn parse_play(play: &str, text: &str) -> Vec<Role> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines
        .iter()
        .position(|l| l.trim_start().to_uppercase().starts_with("ACT "))
    else {
        return Vec::new();
    };
    let mut order: Vec<String> = Vec::new();
    let mut spoken_lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_direction = false;
    for i in start..lines.len() {
        let line = lines[i];
        let trimmed = line.trim();
        if in_direction {
            in_direction = !trimmed.ends_with(']');
            continue;
        }
        if trimmed.is_empty() {
            current = None;
            continue;
        }
        if trimmed.starts_with('[') {
            in_direction = !trimmed.ends_with(']');
            continue;
        }
        let prev_blank = i == 0 || lines[i - 1].trim().is_empty();
        if let Some(name) = speaker(line, prev_blank, lines.get(i + 1).copied()) {
            if !spoken_lines.contains_key(&name) {
                order.push(name.clone());
            }
            spoken_lines.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        if let Some(name) = &current {
            let words = spoken(line);
            if !words.is_empty()
                && let Some(v) = spoken_lines.get_mut(name)
            {
                v.push(words);
            }
        }
    }
    order
        .into_iter()
        .filter_map(|name| {
            let all = spoken_lines.remove(&name)?;
            if all.len() < 2 {
                return None;
            }
            let train = (all.len() * 4 / 5).clamp(1, all.len() - 1);
            let (train, test) = all.split_at(train);
            Some(Role {
                play: play.to_owned(),
                name,
                train: train.to_vec(),
                test: test.to_vec(),
            })
        })
        .collect()
}

/// Every role of every play in `dir` (`*.txt` files, in name order; a
/// play's name is its file name without `_gut.txt`).
pub fn load(dir: &Path) -> Result<Vec<Role>, TextError> {
    let docs = super::text::read_documents(dir)?;
    let mut roles = Vec::new();
    for doc in docs {
        let file = Path::new(&doc.source)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let play = file
            .strip_suffix("_gut.txt")
            .or_else(|| file.strip_suffix(".txt"))
            .unwrap_or(&file);
        roles.extend(parse_play(play, &doc.text));
    }
    Ok(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAY: &str = "A PLAY\n\nPERSONS.\n\nA Priest.\nBernardo, Officer.\n\nACT I.\n\nScene I. A platform.\n\n\
[Enter Bernardo\nand Francisco.]\n\nBer.\nWho's there?\n\nFran.\nNay, answer me: stand, and unfold yourself.\n\n\
Ber.\nLong live the king!\n\nFran.\nBernardo?\n\nBer.\nHe.\n\nFran.\nYou come most carefully [Aside.] upon your hour.\n\
GHOST.\nRemember me.\n\nFran.\nI think I hear them.\n\nLone.\nOnly once.\n";

    #[test]
    fn speeches_go_to_their_roles_without_stage_directions() {
        let roles = parse_play("hamlet", PLAY);
        let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
        // GHOST and LONE speak one line each and are left out.
        assert_eq!(names, ["BER", "FRAN"]);
        let ber = &roles[0];
        assert_eq!(ber.train, ["Who's there?", "Long live the king!"]);
        assert_eq!(ber.test, ["He."]);
        let fran = &roles[1];
        assert_eq!(fran.train.len() + fran.test.len(), 4);
        assert_eq!(fran.train[2], "You come most carefully upon your hour.");
        assert_eq!(fran.test, ["I think I hear them."]);
        let data = fran.text_data();
        assert_eq!(data.train[0].text.lines().count(), 3);
        assert_eq!(data.heldout[0].text, "I think I hear them.");
        assert!(parse_play("sonnets", "I\n\nFrom fairest creatures").is_empty());
    }
}
