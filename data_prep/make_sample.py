"""Write the bundled FiQA-schema sample: data_prep/assets/fiqa_sample/{train,validation,test}.jsonl.

Nothing can be downloaded on the machines this project must run on, so the repo ships a small stand-in for
`explodinggradients/fiqa` (config `main`): same schema (`question`: str, `ground_truths`: list[str]) and the same
shape of answer lengths (median ~150 words, ~25% under 100 words, a long tail past 800 words). The rows are
composed from hand-written topic banks (personal finance, investing, taxes, retirement, credit, mortgages,
stocks/bonds/ETFs, small business, ...) by a seeded generator: re-running writes byte-identical files.

    python -m nemotune.data_prep.make_sample            # rewrites the files in the package
    python -m nemotune.data_prep.make_sample --out DIR  # writes elsewhere
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

SEED = 20240611
SPLIT_SIZES = {"train": 264, "validation": 36, "test": 60}
# FiQA `main` answer lengths (measured on the real test split: median 162 words, 26% < 100, ~1.4% > 800).
MEDIAN_WORDS = 142.0
LOG_SIGMA = 0.75
MIN_WORDS, MAX_WORDS = 8, 1400

SAMPLE_DIR = Path(__file__).resolve().parent / "assets" / "fiqa_sample"

FILL = {
    "amount": ["$500", "$1,200", "$2,500", "$5,000", "$8,000", "$10,000", "$15,000", "$25,000", "$40,000",
               "$60,000", "$100,000", "$250,000"],
    "pct": ["2%", "3.5%", "4%", "5%", "6.5%", "7%", "8%", "12%", "15%", "18%", "22%", "24.99%"],
    "age": ["22", "25", "28", "31", "35", "40", "45", "52", "58", "63"],
    "years": ["two", "three", "five", "seven", "ten", "fifteen", "twenty", "thirty"],
    "account": ["401(k)", "Roth IRA", "traditional IRA", "HSA", "brokerage account", "403(b)", "SEP IRA"],
    "debt": ["student loans", "credit card balance", "car loan", "personal loan", "medical debt", "HELOC"],
    "fund": ["S&P 500 index fund", "total market ETF", "target-date fund", "bond fund", "dividend ETF",
             "international index fund"],
    "stock": ["a large tech company", "a utility company", "a small biotech", "a bank stock", "a retailer",
              "an oil major"],
    "business": ["consulting business", "bakery", "landscaping company", "online store", "photography side gig",
                 "freelance design business", "food truck"],
    "state": ["California", "Texas", "New York", "Florida", "Ohio", "Washington", "Illinois"],
    "country": ["Canada", "the UK", "India", "Germany", "Australia", "Singapore"],
    "asset": ["house", "rental property", "stock portfolio", "car", "savings account", "land"],
}

# Each topic: question templates, answer sentences (in a sensible order), related topics for long answers.
TOPICS = {
    "retirement": {
        "questions": [
            "How much should I contribute to my {account} at age {age}?",
            "Is it better to contribute to a Roth IRA or a traditional 401(k)?",
            "I'm {age} with no retirement savings. Is it too late to start?",
            "Should I roll over my old {account} when I change jobs?",
            "What happens if I withdraw early from my {account}?",
            "Does it make sense to max out my {account} before paying off my {debt}?",
        ],
        "sentences": [
            "The first thing to check is whether your employer offers a match, because a match is an immediate return that nothing else in personal finance can beat.",
            "At a minimum, contribute enough to your {account} to capture the full employer match.",
            "A common rule of thumb is to save around 15% of gross income for retirement, including the match.",
            "The choice between Roth and traditional contributions is really a bet on whether your tax rate is higher now or in retirement.",
            "If you are early in your career and in a low bracket, paying the tax now with a Roth usually works out well.",
            "If you are in a high bracket today, the deduction from traditional contributions is worth more to you.",
            "Withdrawals before age 59 and a half generally trigger a 10% penalty on top of ordinary income tax, with a handful of exceptions.",
            "Rolling an old plan into an IRA usually gives you more investment choices and lower fees, but check whether your new employer plan accepts roll-ins.",
            "Keep the money moving through a direct trustee-to-trustee transfer so nothing is withheld and you do not risk missing the 60-day window.",
            "Starting at {age} is not too late; the key is a higher savings rate and a realistic plan for when you stop working.",
            "Catch-up contributions are allowed once you turn 50, which lets you put away extra each year.",
            "Most people do well with a low-cost {fund} inside the plan rather than trying to pick individual funds.",
            "Check the expense ratios of the funds in your plan, because a 1% annual fee compounds into a very large number over {years} decades.",
            "Social Security will likely replace only part of your income, so treat it as a floor rather than the whole plan.",
            "Run the numbers with a retirement calculator every year or two and adjust your contribution as your income grows.",
            "An HSA can double as a retirement account if you pay current medical costs out of pocket and let it grow.",
        ],
        "related": ["investing", "taxes"],
    },
    "investing": {
        "questions": [
            "Where should I invest {amount} that I won't need for {years} years?",
            "Are index funds really better than picking stocks?",
            "Is now a bad time to invest with the market at an all-time high?",
            "Should I invest a lump sum or use dollar-cost averaging?",
            "How many ETFs should a beginner own?",
            "What is a reasonable expected return for a {fund}?",
        ],
        "sentences": [
            "Before investing anything, make sure you have an emergency fund of three to six months of expenses and no high-interest debt.",
            "For money you will not touch for {years} years, a diversified portfolio of low-cost index funds is hard to beat.",
            "Most actively managed funds underperform their benchmark index after fees over long periods.",
            "Picking individual stocks concentrates your risk; even professional analysts struggle to beat the market consistently.",
            "Markets are at all-time highs a large share of the time, so that alone is not a reason to wait.",
            "Studies of lump-sum versus dollar-cost averaging show that investing the whole amount immediately wins roughly two thirds of the time, because markets rise more often than they fall.",
            "Dollar-cost averaging is still reasonable if it helps you sleep at night and keeps you from abandoning the plan.",
            "A simple three-fund portfolio of a total US market fund, an international fund and a bond fund gives broad diversification.",
            "Owning more than a handful of overlapping ETFs rarely adds diversification; it just makes rebalancing harder.",
            "Historically, broad US stocks have returned somewhere around 7% a year after inflation, but with large swings from year to year.",
            "Nobody can promise a return, and you should expect at least one decline of 30% or more over a long holding period.",
            "Your asset allocation between stocks and bonds matters far more than which particular fund you choose.",
            "Rebalance once a year or when your allocation drifts more than five percentage points from the target.",
            "Keep costs low: an expense ratio of 0.05% versus 1% is a difference of tens of thousands of dollars over a career.",
            "Do not invest money you may need within a few years in stocks, because a downturn could force you to sell at a loss.",
            "Automating a monthly contribution removes most of the temptation to time the market.",
        ],
        "related": ["stocks_bonds", "retirement"],
    },
    "taxes": {
        "questions": [
            "Do I have to pay taxes on a {amount} gift from my parents?",
            "How are capital gains taxed when I sell my {asset}?",
            "I made {amount} from a side job. How do I file taxes on it?",
            "Can I deduct my home office as a freelancer?",
            "Why do I owe taxes this year when I got a refund last year?",
            "How does moving from {state} to another state affect my income taxes?",
        ],
        "sentences": [
            "In the US, gift tax is the responsibility of the giver, not the recipient, and only amounts above the annual exclusion need to be reported.",
            "Even then, the giver usually owes nothing because reported gifts just reduce their lifetime exemption.",
            "Capital gains on assets held longer than a year are taxed at the long-term rates of 0%, 15% or 20%, depending on your income.",
            "Gains on assets held a year or less are short-term and taxed as ordinary income.",
            "Your cost basis is what you paid plus certain costs such as commissions or improvements, and the gain is the sale price minus that basis.",
            "Side income is reported on Schedule C, and you owe self-employment tax of about 15.3% on the net profit in addition to income tax.",
            "If you expect to owe more than $1,000, make quarterly estimated payments to avoid an underpayment penalty.",
            "Keep receipts for every business expense, because deductions reduce both income tax and self-employment tax.",
            "The home office deduction requires a space used regularly and exclusively for the business.",
            "The simplified method allows five dollars per square foot, up to 300 square feet, and avoids tracking actual expenses.",
            "A refund only means you overpaid during the year; owing money usually means your withholding dropped or your income rose.",
            "Review your W-4 after any change in jobs, marriage or a large side income so your withholding matches your liability.",
            "State residency rules differ, and you may have to file part-year returns in both states in the year you move.",
            "Some states, such as Texas, Florida and Washington, have no wage income tax, but they often make up for it with sales or property taxes.",
            "A tax professional is worth the fee when you have self-employment income, rental property or a multi-state situation.",
            "Tax-loss harvesting lets you sell losing positions to offset gains, but watch the 30-day wash sale rule.",
        ],
        "related": ["small_business", "retirement"],
    },
    "credit": {
        "questions": [
            "Will closing an old credit card hurt my credit score?",
            "How can I raise my credit score from 620 to 700 quickly?",
            "Is it bad to carry a small balance on my credit card?",
            "Why did my credit score drop after I paid off my {debt}?",
            "Should I use a balance transfer card to pay off a {amount} balance?",
            "How many credit cards is too many?",
        ],
        "sentences": [
            "Your score is driven mostly by payment history and credit utilization, the share of your available credit you are using.",
            "Closing an old card reduces your total available credit, which can push your utilization up and lower your score.",
            "The age of the account stays on your report for up to ten years after closing, so the effect on average age is gradual.",
            "Carrying a balance does not help your score; paying the statement balance in full every month is the best approach.",
            "Interest at {pct} on a revolving balance wipes out almost any return you could earn elsewhere.",
            "Utilization is measured on the balance reported on your statement date, so paying before the statement closes lowers it.",
            "Keeping utilization below 10% on each card and overall tends to produce the best scores.",
            "Paying off an installment loan can cause a small, temporary drop because you have one fewer active account, and it is nothing to worry about.",
            "A single late payment can cost dozens of points and stays on your report for seven years, so set up autopay for at least the minimum.",
            "Balance transfers can save a lot of interest if you can pay the balance off before the promotional period ends.",
            "Watch for the transfer fee, usually 3% to 5% of the amount moved, and for deferred interest clauses.",
            "There is no magic number of cards; what matters is that you can track them and never miss a payment.",
            "Check your reports from all three bureaus for free and dispute any errors you find.",
            "Hard inquiries have a small effect and stop counting toward your score after a year.",
            "Becoming an authorized user on a family member's old, well-managed card can help build a thin file.",
        ],
        "related": ["debt", "mortgages"],
    },
    "mortgages": {
        "questions": [
            "Should I choose a 15-year or a 30-year mortgage?",
            "Is it worth refinancing my mortgage to save half a percent?",
            "How much house can I afford on a {amount} salary?",
            "Should I make extra payments on my mortgage or invest the money?",
            "Do I need 20% down to buy a {asset}?",
            "Is it better to rent or buy in {state}?",
        ],
        "sentences": [
            "A 15-year mortgage carries a lower rate and far less total interest, but the required payment is much higher.",
            "A 30-year loan gives flexibility: you can always pay extra, but you cannot make a 15-year payment smaller in a bad year.",
            "Refinancing makes sense when the monthly savings recover the closing costs well before you expect to sell or refinance again.",
            "Divide the total closing costs by the monthly savings to get the break-even point in months.",
            "Lenders typically want total housing costs below about 28% of gross income and total debt payments below about 36%.",
            "Being approved for a loan does not mean the payment fits your budget; include taxes, insurance, maintenance and any HOA fees.",
            "Prepaying a mortgage at {pct} is a guaranteed, risk-free return equal to that rate.",
            "If your mortgage rate is low, investing the extra money has historically come out ahead, but with risk.",
            "You do not need 20% down, but putting less down usually means paying private mortgage insurance until you reach 20% equity.",
            "FHA loans allow as little as 3.5% down, though the mortgage insurance on them is harder to remove.",
            "Renting is not throwing money away; interest, property taxes and maintenance are unrecoverable costs of owning too.",
            "Buying tends to win if you stay at least five to seven years, because transaction costs on both ends are high.",
            "Budget roughly 1% to 2% of the home's value each year for maintenance and repairs.",
            "Shop at least three lenders and compare the loan estimates line by line, including points and fees.",
            "Keep an emergency fund after closing; draining all your savings for the down payment is a common mistake.",
        ],
        "related": ["credit", "budgeting"],
    },
    "stocks_bonds": {
        "questions": [
            "Why do bond prices fall when interest rates rise?",
            "What does it mean when a stock pays a {pct} dividend?",
            "Should I buy individual bonds or a bond ETF?",
            "What happens to my shares of {stock} if the company goes bankrupt?",
            "How do stock buybacks benefit shareholders?",
            "Why would a company split its stock?",
        ],
        "sentences": [
            "An existing bond pays a fixed coupon, so when new bonds are issued at higher rates, the old one has to fall in price to offer a competitive yield.",
            "The longer the bond's duration, the more its price moves for a given change in interest rates.",
            "A dividend yield of {pct} means the annual dividend equals that percentage of the current share price.",
            "A very high yield is often a warning sign that the market expects the dividend to be cut.",
            "Dividends are not free money: the share price drops by roughly the dividend amount on the ex-dividend date.",
            "Individual bonds held to maturity return your principal if the issuer does not default, while a bond fund never matures.",
            "Bond ETFs offer instant diversification and liquidity, which matters a lot for corporate and municipal bonds.",
            "In a bankruptcy, bondholders and other creditors are paid before shareholders, and common stock is often wiped out entirely.",
            "Buybacks reduce the number of shares outstanding, so each remaining share owns a larger piece of the company's earnings.",
            "Buybacks are economically similar to dividends but can be more tax-efficient for shareholders who do not sell.",
            "A stock split changes nothing about the value of the company; it just cuts the pie into more slices.",
            "Companies split shares mostly to keep the price per share in a range that feels accessible to retail investors.",
            "Treasury bonds carry essentially no default risk, while high-yield corporate bonds pay more because they can default.",
            "Look at the expense ratio, duration and credit quality before choosing a {fund}.",
            "Stocks represent ownership and have higher expected returns with higher volatility; bonds are loans and are usually steadier.",
        ],
        "related": ["investing", "taxes"],
    },
    "budgeting": {
        "questions": [
            "How do I start a budget when my income varies every month?",
            "How big should my emergency fund be?",
            "Is the 50/30/20 rule realistic on a {amount} salary?",
            "Where should I keep my emergency fund?",
            "How can I stop overspending on food and subscriptions?",
            "My partner and I earn very different amounts. How should we split expenses?",
        ],
        "sentences": [
            "Start by tracking every expense for one or two months so that the budget is based on real numbers rather than guesses.",
            "With an irregular income, budget from your lowest typical month and treat anything above that as a bonus to allocate.",
            "An emergency fund of three to six months of essential expenses covers most job losses and surprise bills.",
            "If your income is unstable or you are the only earner, aim for the upper end of that range.",
            "Keep the emergency fund in a high-yield savings account that is separate from your checking but easy to reach.",
            "The 50/30/20 rule splits take-home pay into needs, wants and savings; treat it as a starting point, not a law.",
            "In high-cost cities, needs often exceed 50%, so shrink the wants category before you shrink savings.",
            "Pay yourself first by automating a transfer to savings on payday.",
            "Review your bank statements for subscriptions you forgot about; most people find at least one they no longer use.",
            "Meal planning and a weekly grocery list reduce food spending more reliably than willpower does.",
            "Couples with unequal incomes often split shared costs in proportion to income rather than fifty-fifty.",
            "Whatever the split, agree on it explicitly and revisit it when your incomes change.",
            "Give each person some money that is theirs to spend without justification; it prevents a lot of arguments.",
            "A zero-based budget assigns every dollar a job, which makes it obvious where the money goes.",
            "Small recurring costs add up: a {amount} yearly total from small purchases is common.",
        ],
        "related": ["debt", "credit"],
    },
    "debt": {
        "questions": [
            "Should I pay off my {debt} or save for an emergency fund first?",
            "Is the debt snowball or the debt avalanche method better?",
            "Should I consolidate {amount} of debt with a personal loan?",
            "Is it smart to use my savings to pay off my {debt}?",
            "What happens if I stop paying my {debt}?",
            "Should I refinance my student loans at {pct}?",
        ],
        "sentences": [
            "Build a small starter emergency fund of about one month of expenses first, so a surprise bill does not go on a credit card.",
            "After that, attack high-interest debt aggressively, because paying off a {pct} balance is a guaranteed return at that rate.",
            "The avalanche method pays the highest interest rate first and saves the most money mathematically.",
            "The snowball method pays the smallest balance first and gives quick wins that keep many people motivated.",
            "The best method is the one you will actually stick with until the debt is gone.",
            "A consolidation loan helps only if the new rate is lower and you stop adding new charges to the old cards.",
            "Read the fine print for origination fees, which can eat much of the interest savings.",
            "Using savings to pay debt makes sense for high-rate balances, but do not leave yourself with no cushion at all.",
            "Stopping payments leads to late fees, collections and a damaged credit report, and possibly a lawsuit or wage garnishment.",
            "If you cannot pay, call the lender before you miss a payment; hardship programs are far easier to get beforehand.",
            "Refinancing federal student loans into a private loan gives up income-driven repayment and forgiveness options.",
            "If your job is stable and the new rate is much lower, refinancing private loans is usually a clear win.",
            "List every debt with its balance, rate and minimum payment so you can see the whole picture.",
            "Be wary of debt settlement companies that charge large fees and tell you to stop paying your creditors.",
            "Once a debt is paid off, roll its payment into the next one instead of letting it disappear into spending.",
        ],
        "related": ["budgeting", "credit"],
    },
    "small_business": {
        "questions": [
            "Should I form an LLC for my {business}?",
            "How should I pay myself from my {business}?",
            "Do I need a separate bank account for my {business}?",
            "How do I handle sales tax for my {business} in {state}?",
            "Can I deduct my car if I use it for my {business}?",
            "What records should I keep for my {business}?",
        ],
        "sentences": [
            "An LLC separates your personal assets from business liabilities, but only if you keep the finances truly separate.",
            "For tax purposes, a single-member LLC is a disregarded entity by default and is taxed just like a sole proprietorship.",
            "Once profits are substantial, electing S-corporation status can reduce self-employment tax, at the cost of running payroll.",
            "In a sole proprietorship or single-member LLC, you pay yourself with an owner's draw, which is not a deductible expense.",
            "If you elect S-corp status, you must pay yourself a reasonable salary through payroll before taking distributions.",
            "Open a separate business checking account from day one; mixing funds makes bookkeeping and any audit much harder.",
            "Sales tax rules are set by each state, and online sellers may owe tax in states where they pass economic nexus thresholds.",
            "Register with your state's revenue department before you start collecting sales tax.",
            "For a vehicle, you can deduct either the standard mileage rate or actual expenses for the business-use share, but you need a mileage log.",
            "Keep invoices, receipts, bank statements and a mileage log for at least three years, and longer for asset purchases.",
            "Accounting software that connects to your bank account saves hours every month.",
            "Set aside roughly 25% to 30% of profit for taxes in a separate savings account.",
            "Check whether your city or county requires a business license, even for a home-based business.",
            "Business insurance is worth pricing early, since an LLC does not protect you from your own professional negligence.",
            "Talk to a CPA in your first year; getting the structure right early is cheaper than fixing it later.",
        ],
        "related": ["taxes", "budgeting"],
    },
    "insurance": {
        "questions": [
            "Do I need life insurance if I'm {age} and single?",
            "Is whole life insurance a good investment?",
            "How much term life insurance should I buy?",
            "Should I raise my car insurance deductible to {amount}?",
            "Is disability insurance worth it?",
            "Do I need renters insurance?",
        ],
        "sentences": [
            "Life insurance exists to replace income that someone else depends on; if nobody depends on you, you may not need it yet.",
            "Term life insurance is inexpensive and covers the years when your family relies on your income.",
            "Whole life combines insurance with a low-return savings component and high commissions, so it rarely beats buying term and investing the difference.",
            "A common guideline is coverage of ten to twelve times your annual income, adjusted for debts and children's education.",
            "Raising your deductible lowers the premium, but only do it if your emergency fund can absorb the deductible comfortably.",
            "Compare the yearly premium savings to the extra deductible to see how many claim-free years it takes to come out ahead.",
            "Disability insurance protects your most valuable asset, your ability to earn an income, and is often overlooked.",
            "Check whether your employer's disability policy covers your own occupation and what share of income it replaces.",
            "Renters insurance is cheap and covers your belongings and your personal liability, which your landlord's policy does not.",
            "Umbrella liability insurance becomes worthwhile as your net worth grows.",
            "Review your policies once a year and whenever you marry, have a child, or buy a home.",
            "Shop your auto and home insurance every couple of years, because loyal customers often pay more.",
            "Insurance is for losses you cannot afford; self-insure small risks with your emergency fund.",
        ],
        "related": ["budgeting", "retirement"],
    },
    "banking": {
        "questions": [
            "Is my money safe in an online bank?",
            "How do I deposit a check made out to my {business} into my account?",
            "Why would my bank hold a deposit of {amount}?",
            "Should I keep more than $250,000 in one bank?",
            "What is the best way to send money to family in {country}?",
            "How do CDs compare to high-yield savings accounts?",
        ],
        "sentences": [
            "Deposits at FDIC-insured banks are protected up to $250,000 per depositor, per bank, per ownership category, whether the bank is online or not.",
            "Confirm the bank's FDIC membership on the FDIC website rather than trusting the bank's own marketing.",
            "A check made out to a business generally has to be deposited into an account in the business's name.",
            "Banks may place a hold on large or unusual deposits while the check clears, and the hold period is governed by federal rules.",
            "If you need more than the insurance limit covered, spread the money across several banks or use different ownership categories.",
            "Cash sweep programs at brokerages can extend coverage by placing your cash at several partner banks.",
            "For international transfers, compare the exchange rate you receive, not just the fee, because the markup is often hidden in the rate.",
            "Specialized transfer services are usually cheaper than a bank wire for sending money to {country}.",
            "A CD locks your money for a fixed term in exchange for a guaranteed rate, with a penalty for early withdrawal.",
            "High-yield savings rates can change at any time, but your money stays fully accessible.",
            "Building a CD ladder with staggered maturities gives you some of both: higher rates and regular access.",
            "Avoid banks that charge monthly maintenance fees; plenty of good accounts have none.",
            "Turn on transaction alerts so you notice fraud quickly; reporting it promptly limits your liability.",
        ],
        "related": ["budgeting", "small_business"],
    },
    "real_estate": {
        "questions": [
            "Is buying a {asset} to rent out a good investment?",
            "How do I calculate the return on a rental property?",
            "Should I sell my {asset} or keep it as a rental when I move?",
            "Are REITs a good alternative to owning rental property?",
            "What expenses can I deduct on a rental property?",
        ],
        "sentences": [
            "Rental property can be a good investment, but it is a business that comes with tenants, repairs and vacancies.",
            "Start with the cap rate: net operating income after all expenses except the mortgage, divided by the purchase price.",
            "Use conservative assumptions, such as a vacancy rate of 5% to 10% and maintenance of about 1% of value per year.",
            "Cash-on-cash return compares your annual cash flow after the mortgage to the cash you actually put in.",
            "Keeping your old home as a rental can work if it cash-flows well, but remember you lose the capital gains exclusion after three years away.",
            "REITs give you real estate exposure with daily liquidity and no landlord duties, though their dividends are taxed as ordinary income.",
            "Rental expenses such as mortgage interest, property taxes, insurance, repairs and depreciation are deductible against rental income.",
            "Depreciation lowers your taxable income each year but is recaptured when you sell.",
            "Leverage magnifies returns in both directions, so a small drop in rents can turn a property cash-flow negative.",
            "Budget for property management at around 8% to 10% of rent even if you plan to self-manage.",
            "Screen tenants carefully; one bad tenant can wipe out several years of profit.",
            "Compare the expected return to simply investing the down payment in a {fund}, which requires no work at all.",
        ],
        "related": ["mortgages", "taxes"],
    },
    "education": {
        "questions": [
            "Should I use a 529 plan or a Roth IRA to save for my kids' college?",
            "How much should I save for my child's education?",
            "Is it worth taking {amount} in student loans for a graduate degree?",
            "Does money in a 529 plan hurt financial aid?",
        ],
        "sentences": [
            "A 529 plan grows tax-free when used for qualified education expenses, and many states add a deduction for contributions.",
            "A Roth IRA is more flexible, since contributions can be withdrawn at any time, but it is primarily for your retirement.",
            "Prioritize your own retirement over college savings: your children can borrow for school, but nobody lends for retirement.",
            "Even saving a third of projected costs makes a meaningful difference and limits future borrowing.",
            "Compare the expected salary increase from the degree to the total cost, including the income you give up while studying.",
            "A useful rule is to borrow no more in total than your expected first-year salary.",
            "Parent-owned 529 assets count only modestly in the federal aid formula.",
            "Unused 529 money can be moved to another family member, and recent rules allow limited rollovers into a Roth IRA.",
            "Look at the net price after grants, not the sticker price, when comparing schools.",
            "Federal student loans have protections that private loans lack, so use them first.",
        ],
        "related": ["debt", "taxes"],
    },
    "international": {
        "questions": [
            "I'm moving from {country} to the US. What should I do with my retirement savings?",
            "How are foreign stocks taxed for a US investor?",
            "Should I hedge currency risk in my international {fund}?",
            "Do I need to report a bank account I hold in {country}?",
        ],
        "sentences": [
            "Cross-border situations are complicated, so it is worth paying for advice from someone who knows both tax systems.",
            "Foreign retirement accounts may not receive the same tax treatment in the US, and some foreign funds are treated punitively.",
            "US persons must report foreign accounts whose combined value exceeds $10,000 at any point in the year on an FBAR.",
            "Dividends from foreign companies often have tax withheld abroad, and you can usually claim a foreign tax credit for it.",
            "Currency movements add volatility to foreign stock returns, but over long periods they tend to roughly even out.",
            "Hedging is more useful for foreign bonds than foreign stocks, because currency swings can overwhelm bond returns.",
            "Tax treaties may reduce withholding rates, but you often have to file forms to receive the lower rate.",
            "Avoid buying foreign-domiciled mutual funds as a US person, since they can be classified as PFICs with burdensome reporting.",
            "Keep records of exchange rates on the dates you buy and sell, because gains are measured in dollars.",
            "Moving money across borders in one large transfer may be cheaper than many small ones, depending on the provider's fees.",
        ],
        "related": ["taxes", "banking"],
    },
}

OPENERS = [
    "Short answer: it depends on your situation, but there are a few clear guidelines.",
    "This is a common question, and the answer comes down to a few numbers.",
    "Good question.",
    "There is no single right answer here, but here is how I would think about it.",
    "You are asking the right question at the right time.",
    "Let me break this down into the parts that matter.",
    "I went through the same decision a few years ago.",
    "The general rule is simple, but the details matter.",
    "First, some context.",
    "It helps to separate the tax question from the investment question.",
]

GENERIC = [
    "Everyone's situation is different, so run the numbers with your own income, expenses and goals.",
    "Write the plan down; a written plan is much easier to follow when markets or life get bumpy.",
    "Fees and taxes are the two costs you can control, so minimize both.",
    "Avoid making big financial decisions in a hurry or under pressure from a salesperson.",
    "If a product is complicated and pays the seller a large commission, be skeptical.",
    "A fee-only fiduciary adviser can review your plan for a flat fee without selling you anything.",
    "Keep good records; you will need them at tax time and if anything is ever disputed.",
    "Revisit the decision once a year, or whenever your income or family situation changes.",
    "Think about the worst case as well as the expected case, and make sure you could survive it.",
    "Liquidity matters: money you cannot reach in an emergency is not an emergency fund.",
    "Inflation of even 3% a year halves purchasing power in about 24 years, so cash alone is not a long-term plan.",
    "Compounding rewards starting early far more than it rewards picking the perfect investment.",
    "Consistency beats cleverness in personal finance.",
    "If you have a spouse or partner, make these decisions together so the plan fits both of you.",
    "Read the official IRS publication on the topic; they are more readable than most people expect.",
    "For example, {amount} growing at {pct} a year for {years} years becomes a meaningful sum.",
    "Numbers like these are illustrations, not promises.",
    "Be careful with advice from forums, including this one, and verify anything that affects your taxes.",
    "Check the rules in {state}, because state law can change the answer.",
    "The simplest plan you will stick with beats a complicated one you abandon.",
    "Automate as much as possible so good decisions happen without willpower.",
    "Keep your emergency savings separate from money meant for long-term goals.",
    "Your own behavior is usually the biggest risk to your returns.",
    "A good first step is to list your assets, debts, income and expenses on one page.",
]

CLOSERS = [
    "Hope this helps.",
    "Good luck!",
    "In short: keep costs low, stay diversified, and be patient.",
    "If in doubt, talk to a qualified professional who is paid by you and not by commissions.",
    "That is the general framework; the exact answer depends on your numbers.",
    "Whatever you decide, write down why, so you can learn from it later.",
]

SHORT_ANSWERS = [
    "No.", "Yes, as long as you keep records.", "It depends on your tax bracket.",
    "Probably not.", "Yes, but only up to the annual limit.",
]


def _fill(text: str, rng: random.Random) -> str:
    for slot, values in FILL.items():
        token = "{" + slot + "}"
        while token in text:
            text = text.replace(token, rng.choice(values), 1)
    return text


def _target_words(rng: random.Random) -> int:
    words = math.exp(math.log(MEDIAN_WORDS) + LOG_SIGMA * rng.gauss(0.0, 1.0))
    return int(min(MAX_WORDS, max(MIN_WORDS, round(words))))


def _answer(topic: str, target: int, rng: random.Random) -> str:
    spec = TOPICS[topic]
    if target <= 12:
        return rng.choice(SHORT_ANSWERS) + " " + _fill(rng.choice(spec["sentences"]), rng)
    own = list(spec["sentences"])
    rng.shuffle(own)
    related = [s for name in spec["related"] for s in TOPICS[name]["sentences"]]
    rng.shuffle(related)
    generic = list(GENERIC)
    rng.shuffle(generic)
    # Own-topic sentences first, then generic advice interleaved with related topics for long answers.
    pool = own + [s for pair in zip(generic, related) for s in pair] + related[len(generic):]
    sentences = [rng.choice(OPENERS)] if rng.random() < 0.6 else []
    count = sum(len(s.split()) for s in sentences)
    for sentence in pool:
        if count >= target:
            break
        sentence = _fill(sentence, rng)
        sentences.append(sentence)
        count += len(sentence.split())
    if rng.random() < 0.4 and count > 40:
        sentences.append(rng.choice(CLOSERS))
    paragraphs, current = [], []
    for sentence in sentences:
        current.append(sentence)
        if len(current) >= rng.randint(3, 6):
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return ("\n\n" if rng.random() < 0.5 else "  ").join(paragraphs)


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    seen: set[str] = set()
    rows = []
    total = sum(SPLIT_SIZES.values())
    while len(rows) < total:
        topic = topics[len(rows) % len(topics)] if rng.random() < 0.7 else rng.choice(topics)
        question = _fill(rng.choice(TOPICS[topic]["questions"]), rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "ground_truths": [_answer(topic, _target_words(rng), rng)]})
    rng.shuffle(rows)
    splits, start = {}, 0
    for name, size in SPLIT_SIZES.items():
        splits[name] = rows[start:start + size]
        start += size
    return splits


def write(out_dir: Path = SAMPLE_DIR, seed: int = SEED) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate(seed).items():
        path = out_dir / f"{split}.jsonl"
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        path.write_bytes(text.encode("utf-8"))
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR, help="output directory (default: the package's)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for split, path in write(args.out, args.seed).items():
        lines = path.read_text(encoding="utf-8").splitlines()
        print(f"{split:<10} {len(lines):>4} rows  {path.stat().st_size:>8} bytes  {path}")


if __name__ == "__main__":
    main()
