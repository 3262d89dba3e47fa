//! The judge through an OpenAI-compatible server (`--judge openai:MODEL@BASE_URL`): the
//! same rubrics, parsing, repair retries and invalid labels as the local judge; only the
//! replies come from the server, greedy, `concurrency` requests at a time.

use anyhow::Result;

use crate::backends::openai::{ChatRequest, Client};
use crate::prompt::Message;

/// One greedy reply per conversation, in order. A judge that thinks (a reasoning model
/// behind the server) is read from its answer, not its reasoning.
pub fn replies(client: &Client, conversations: &[&[Message]], max_tokens: usize) -> Result<Vec<String>> {
    let requests = conversations
        .iter()
        .enumerate()
        .map(|(i, msgs)| (i, ChatRequest { messages: msgs.to_vec(), n: 1, temperature: 0.0, top_p: 1.0, max_tokens, seed: Some(0), ..Default::default() }))
        .collect();
    let mut out = vec![String::new(); conversations.len()];
    client.chat_all(requests, &mut |i, reply| {
        out[i] = reply.choices.into_iter().next().map(|c| c.content).unwrap_or_default();
        Ok(())
    })?;
    Ok(out)
}
